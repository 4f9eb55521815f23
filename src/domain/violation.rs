//! Bad request fields, collected so that one answer names them all. The
//! rules layer turns them into `INVALID_ARGUMENT` with a `BadRequest` detail.

/// One bad request field: its name exactly as in the request message, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: &'static str,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: &'static str, description: impl Into<String>) -> Self {
        Self {
            field,
            description: description.into(),
        }
    }
}

/// The violations of one request, in field order; an `Err` holds at least one.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    /// Keeps the value, or records its violation and returns `None`.
    pub fn check<T>(&mut self, result: Result<T, FieldViolation>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(violation) => {
                self.0.push(violation);
                None
            }
        }
    }

    pub fn push(&mut self, violation: FieldViolation) {
        self.0.push(violation);
    }

    /// Ends the collection: every violation recorded, or else `value` (which
    /// is present whenever nothing was recorded; if a parser forgot to say
    /// why it failed, the request is still refused rather than accepted).
    pub fn finish<T>(self, value: Option<T>) -> Result<T, Self> {
        self.into_result()?;
        value.ok_or_else(|| Self(vec![FieldViolation::new("request", "could not be read")]))
    }

    pub fn into_result(self) -> Result<(), Self> {
        if self.0.is_empty() { Ok(()) } else { Err(self) }
    }

    pub fn into_inner(self) -> Vec<FieldViolation> {
        self.0
    }
}

impl From<FieldViolation> for Violations {
    fn from(violation: FieldViolation) -> Self {
        Self(vec![violation])
    }
}
