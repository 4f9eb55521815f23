//! Roles and the links between users and roles. One SQL text for both backends,
//! expanded into each backend's store by `impl_repositories!`.

macro_rules! impl_role_repository {
    ($store:ty, $db:ty) => {
        async fn require_user(
            conn: &mut <$db as sqlx::Database>::Connection,
            user_id: i64,
        ) -> $crate::storage::Result<()> {
            let exists: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE id = $1")
                .bind(user_id) // $1
                .fetch_one(&mut *conn)
                .await?;
            if exists == 0 {
                return Err($crate::storage::StorageError::NotFound("user"));
            }
            Ok(())
        }

        /// The user's roles, ordered by name.
        async fn roles_of(
            conn: &mut <$db as sqlx::Database>::Connection,
            user_id: i64,
        ) -> $crate::storage::Result<Vec<$crate::storage::RoleRecord>> {
            Ok(sqlx::query_as(
                "SELECT r.id, r.name, r.description, r.created_at FROM roles r \
                 JOIN user_roles ur ON ur.role_id = r.id WHERE ur.user_id = $1 ORDER BY r.name",
            )
            .bind(user_id) // $1
            .fetch_all(&mut *conn)
            .await?)
        }

        #[async_trait::async_trait]
        impl $crate::storage::RoleRepository for $store {
            async fn list_roles(&self) -> $crate::storage::Result<Vec<$crate::storage::RoleRecord>> {
                Ok(sqlx::query_as("SELECT id, name, description, created_at FROM roles ORDER BY name")
                    .fetch_all(self.reader())
                    .await?)
            }

            async fn create_role(
                &self,
                name: &str,
                description: Option<&str>,
                now: i64,
            ) -> $crate::storage::Result<$crate::storage::RoleRecord> {
                let inserted = sqlx::query_as(
                    "INSERT INTO roles (name, description, created_at) VALUES ($1, $2, $3) \
                     RETURNING id, name, description, created_at",
                )
                .bind(name) // $1
                .bind(description) // $2
                .bind(now) // $3
                .fetch_one(self.writer())
                .await;
                match inserted {
                    Err(error) if $crate::storage::sql::is_unique_violation(&error) => {
                        Err($crate::storage::StorageError::Conflict("name"))
                    }
                    other => Ok(other?),
                }
            }

            async fn delete_role(&self, role_id: i64) -> $crate::storage::Result<()> {
                let mut tx = self.begin_write().await?;
                sqlx::query("DELETE FROM user_roles WHERE role_id = $1")
                    .bind(role_id) // $1
                    .execute(&mut *tx)
                    .await?;
                let deleted = sqlx::query("DELETE FROM roles WHERE id = $1")
                    .bind(role_id) // $1
                    .execute(&mut *tx)
                    .await?;
                if deleted.rows_affected() == 0 {
                    return Err($crate::storage::StorageError::NotFound("role"));
                }
                tx.commit().await?;
                Ok(())
            }

            async fn user_roles(
                &self,
                user_id: i64,
            ) -> $crate::storage::Result<Vec<$crate::storage::RoleRecord>> {
                let mut tx = self.reader().begin().await?;
                require_user(&mut tx, user_id).await?;
                let roles = roles_of(&mut tx, user_id).await?;
                tx.commit().await?;
                Ok(roles)
            }

            async fn set_user_roles(
                &self,
                user_id: i64,
                role_ids: &[i64],
            ) -> $crate::storage::Result<Vec<$crate::storage::RoleRecord>> {
                let mut unique_ids = role_ids.to_vec();
                unique_ids.sort_unstable();
                unique_ids.dedup();
                let mut tx = self.begin_write().await?;
                require_user(&mut tx, user_id).await?;
                sqlx::query("DELETE FROM user_roles WHERE user_id = $1")
                    .bind(user_id) // $1
                    .execute(&mut *tx)
                    .await?;
                for role_id in &unique_ids {
                    // Inserting from `roles` adds nothing for an unknown id.
                    let linked = sqlx::query(
                        "INSERT INTO user_roles (user_id, role_id) SELECT $1, id FROM roles WHERE id = $2",
                    )
                    .bind(user_id) // $1
                    .bind(role_id) // $2
                    .execute(&mut *tx)
                    .await?;
                    if linked.rows_affected() == 0 {
                        // Dropping the transaction rolls every change back.
                        return Err($crate::storage::StorageError::NotFound("role"));
                    }
                }
                let roles = roles_of(&mut tx, user_id).await?;
                tx.commit().await?;
                Ok(roles)
            }
        }
    };
}
