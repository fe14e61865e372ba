//! Load-time errors, each pinned to a place in a source file.

use std::fmt;

/// One problem in a definition, `origin:line:column: message`. Lines and columns are 1-based and
/// point at the offending key or value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}:{line}:{column}: {message}")]
pub struct DefinitionError {
    /// A file path, or e.g. "request body".
    pub origin: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Every problem found, in source order per origin. Never empty when returned as an error.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
pub struct DefinitionErrors(pub Vec<DefinitionError>);

impl DefinitionErrors {
    /// The problems in source order: by origin, then line and column (checks find them in
    /// another order).
    pub(crate) fn in_source_order(mut errors: Vec<DefinitionError>) -> Self {
        errors.sort_by(|a, b| (&a.origin, a.line, a.column).cmp(&(&b.origin, b.line, b.column)));
        DefinitionErrors(errors)
    }
}

impl fmt::Display for DefinitionErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl DefinitionErrors {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, DefinitionError> {
        self.0.iter()
    }

    pub(crate) fn single(origin: &str, (line, column): (usize, usize), message: String) -> Self {
        DefinitionErrors(vec![DefinitionError {
            origin: origin.to_owned(),
            line,
            column,
            message,
        }])
    }
}

impl IntoIterator for DefinitionErrors {
    type Item = DefinitionError;
    type IntoIter = std::vec::IntoIter<DefinitionError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl From<DefinitionError> for DefinitionErrors {
    fn from(e: DefinitionError) -> Self {
        DefinitionErrors(vec![e])
    }
}
