//! `with.multipart` of an `http` step: a `multipart/form-data` body of text fields and files, as
//! Pinata's `pinFileToIPFS` and print-on-demand uploads take them. A file is an artifact, read
//! from where artifacts are kept as it is sent (never whole in memory), or text rendered in the
//! definition. The form is made again for each request: a redirect that keeps the body sends it
//! anew.

use reqwest::multipart::{Form, Part};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value};
use switchyard_engine::state::StepFailure;

use crate::artifacts::AttemptArtifacts;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Multipart {
    /// Text fields by name; a value that is not text is sent as its JSON (Pinata's
    /// `pinataMetadata`).
    #[serde(default)]
    fields: Map<String, Value>,
    #[serde(default)]
    files: Vec<FilePart>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct FilePart {
    /// The form field's name, such as `file`.
    name: String,
    /// A stored file: its id, or the `{artifact: {id, ...}}` a step's output holds.
    #[schemars(with = "Option<Value>")]
    artifact: Option<Value>,
    /// Or the file's content, as text.
    text: Option<String>,
    /// The file name the receiver sees; the part's name by default.
    filename: Option<String>,
    /// The artifact's own by default, `text/plain` for text.
    content_type: Option<String>,
}

fn invalid(message: impl Into<String>) -> StepFailure {
    StepFailure::permanent("invalid_parameters", message)
}

/// The artifact id in `value`: an id, `{id}` or `{artifact: {id}}`.
fn artifact_id(value: &Value) -> Option<&str> {
    match value {
        Value::String(id) => Some(id),
        Value::Object(map) => match map.get("artifact") {
            Some(inner) => inner.get("id")?.as_str(),
            None => map.get("id")?.as_str(),
        },
        _ => None,
    }
}

impl Multipart {
    /// Checks what can be checked before a request: each file is one of artifact or text.
    pub fn check(&self) -> Result<(), StepFailure> {
        for (i, file) in self.files.iter().enumerate() {
            let at = format!("`with.multipart.files[{i}]`");
            match (&file.artifact, &file.text) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(invalid(format!(
                        "http step: {at} takes one of `artifact` or `text`"
                    )));
                }
                (Some(value), None) if artifact_id(value).is_none() => {
                    return Err(invalid(format!(
                        "http step: {at}.artifact is an artifact id or {{artifact: {{id, ...}}}}"
                    )));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The form, with each artifact opened to be read as it is sent.
    pub async fn form(&self, artifacts: &AttemptArtifacts) -> Result<Form, StepFailure> {
        let mut form = Form::new();
        for (name, value) in &self.fields {
            let text = match value {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            form = form.text(name.clone(), text);
        }
        for file in &self.files {
            let (part, content_type) = match (&file.artifact, &file.text) {
                (Some(value), _) => {
                    let id = artifact_id(value).unwrap_or_default();
                    let (found, bytes) = artifacts.open(id).await?;
                    (
                        Part::stream_with_length(reqwest::Body::wrap_stream(bytes), found.size),
                        found.content_type,
                    )
                }
                (None, Some(text)) => (Part::text(text.clone()), "text/plain".to_owned()),
                (None, None) => return Err(invalid("http step: a file without content")),
            };
            let content_type = file.content_type.clone().unwrap_or(content_type);
            let part = part
                .file_name(file.filename.clone().unwrap_or_else(|| file.name.clone()))
                .mime_str(&content_type)
                .map_err(|_| {
                    invalid(format!(
                        "http step: {content_type:?} is not a content type (file {})",
                        file.name
                    ))
                })?;
            form = form.part(file.name.clone(), part);
        }
        Ok(form)
    }
}
