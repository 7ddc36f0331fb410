//! Validation errors that name the file, the field and the value at fault.

use std::fmt;

/// One problem with one field of one document.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FieldError {
    /// Dotted path from the document root, e.g. `spec.routes[0].backends[1].weight`.
    pub field: String,
    /// The offending value as written, or empty when the field is missing.
    pub value: String,
    pub message: String,
}

/// Every problem found in one input: a file, an API body, or a wire message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct Invalid {
    /// Where the input came from: a file path, `request body`, ...
    pub source_name: String,
    pub errors: Vec<FieldError>,
}

// === impl FieldError ===

impl FieldError {
    pub fn new(field: impl Into<String>, value: impl fmt::Display, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            value: value.to_string(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}: {}", self.field, self.message)
        } else {
            write!(f, "{}: {} (value: {})", self.field, self.message, self.value)
        }
    }
}

// === impl Invalid ===

impl Invalid {
    pub fn new(source_name: impl Into<String>, errors: Vec<FieldError>) -> Self {
        Self {
            source_name: source_name.into(),
            errors,
        }
    }

    pub fn one(source_name: impl Into<String>, error: FieldError) -> Self {
        Self::new(source_name, vec![error])
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration in {}:", self.source_name)?;
        for e in &self.errors {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}
