//! The binary's command line: migrations, configuration errors.

use std::process::{Command, Stdio};

fn ai_message(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ai-message"));
    command
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn migrate_status_lists_pending_then_applied_and_revert_undoes_the_latest() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("DATABASE_URL", "sqlite:///data/app.db")];

    let before = ai_message(dir.path(), &["migrate", "status"], &env);
    assert!(before.status.success(), "{before:?}");
    let text = stdout(&before);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].ends_with(" pending"), "{text}");
    assert!(lines[0].contains("initial schema"), "{text}");
    assert_eq!(*lines.last().unwrap(), "current version: none");
    assert!(
        dir.path().join("data/app.db").exists(),
        "SQLAlchemy's sqlite:/// is relative"
    );

    let migrate = ai_message(dir.path(), &["migrate"], &env);
    assert!(migrate.status.success(), "{migrate:?}");
    let text = stdout(&ai_message(dir.path(), &["migrate", "status"], &env));
    let first_version = text.split_whitespace().next().unwrap().to_owned();
    assert!(text.lines().next().unwrap().ends_with(" applied"), "{text}");
    assert!(text.contains("current version: "), "{text}");
    assert!(!text.contains("current version: none"), "{text}");

    let revert = ai_message(dir.path(), &["migrate", "revert"], &env);
    assert!(revert.status.success(), "{revert:?}");
    let text = stdout(&ai_message(dir.path(), &["migrate", "status"], &env));
    let latest = text.lines().rev().nth(1).unwrap();
    assert!(
        latest.ends_with(" pending"),
        "the latest migration is pending again: {text}"
    );
    let _ = first_version;
}

#[test]
fn bad_configuration_stops_with_one_line_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    for (name, value) in [
        ("DATABASE_URL", "mysql://localhost/app"),
        ("AI_MESSAGE_ACCESS_TOKEN_TTL", "forever"),
        ("AI_MESSAGE_BCRYPT_COST", "99"),
        ("AI_MESSAGE_SECRET_KEY", "too-short"),
    ] {
        let output = ai_message(dir.path(), &["migrate", "status"], &[(name, value)]);
        assert!(!output.status.success(), "{name}={value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(name), "{stderr}");
    }
}

#[test]
fn an_unreachable_postgres_database_fails_naming_database_url() {
    let dir = tempfile::tempdir().unwrap();
    let key = "k".repeat(32);
    let output = ai_message(
        dir.path(),
        &["migrate"],
        &[
            (
                "DATABASE_URL",
                "postgresql+psycopg2://nobody@127.0.0.1:1/none",
            ),
            ("AI_MESSAGE_SECRET_KEY", &key),
        ],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
    assert!(!stderr.contains("nobody:"), "{stderr}");
}

#[test]
fn create_superuser_without_a_password_on_standard_input_fails() {
    let dir = tempfile::tempdir().unwrap();
    let output = ai_message(
        dir.path(),
        &[
            "create-superuser",
            "--username",
            "root.admin",
            "--email",
            "root@example.com",
        ],
        &[
            ("DATABASE_URL", "sqlite://admin.db"),
            ("AI_MESSAGE_BCRYPT_COST", "4"),
        ],
    );
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("password"));
}

#[test]
fn descriptor_writes_the_served_set_with_http_options_to_stdout_or_a_file() {
    use prost_reflect::DescriptorPool;
    let dir = tempfile::tempdir().unwrap();
    // No configuration at all is needed, not even a usable DATABASE_URL.
    let env = [("DATABASE_URL", "postgres://unreachable.invalid/db")];
    let printed = ai_message(dir.path(), &["descriptor"], &env);
    assert!(printed.status.success(), "{printed:?}");
    assert_eq!(printed.stdout, ai_message::proto::FILE_DESCRIPTOR_SET);
    let pool = DescriptorPool::decode(printed.stdout.as_slice()).unwrap();
    let http = pool.get_extension_by_name("google.api.http").unwrap();
    let login = pool
        .get_service_by_name("aimessage.v1.AuthService")
        .unwrap()
        .methods()
        .find(|m| m.name() == "Login")
        .unwrap();
    assert!(login.options().has_extension(&http), "options are kept");
    for file in [
        "aimessage/v1/auth.proto",
        "google/api/http.proto",
        "google/protobuf/timestamp.proto",
        "google/rpc/status.proto",
    ] {
        assert!(
            pool.get_file_by_name(file).is_some(),
            "{file} is in the set"
        );
    }

    let written = ai_message(dir.path(), &["descriptor", "--output", "set.binpb"], &env);
    assert!(written.status.success(), "{written:?}");
    assert!(written.stdout.is_empty());
    assert_eq!(
        std::fs::read(dir.path().join("set.binpb")).unwrap(),
        printed.stdout
    );
}
