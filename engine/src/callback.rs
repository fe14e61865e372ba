//! Tokens for results that outside systems hand back to a parked step (the n8n bridge): the step
//! that waits stores a secret in its checkpoint (`callback_token`), the outside system gets it
//! with the step's address, and `Store::deliver_callback` takes the result.

/// Where n8n posts results, under the public address of the API.
pub const N8N_CALLBACK_PATH: &str = "/api/webhooks/n8n";

/// The token the outside system sends back: the step it belongs to, and the secret the step
/// stored.
pub fn token(run_id: &str, step_id: &str, secret: &str) -> String {
    format!("{run_id}.{step_id}.{secret}")
}

/// The callback token of a step that waits for signal `name` (the `wait` step kind). Signals
/// come from operators, who are authenticated, so the token is no secret: it only names what the
/// step waits for, and lets a signal that arrives before the step parks be kept like a callback.
pub fn signal_token(name: &str) -> String {
    format!("signal:{name}")
}

/// `(run_id, step_id, secret)` out of a [`token`]. Run ids and step ids hold no dots.
pub fn parse_token(token: &str) -> Option<(&str, &str, &str)> {
    let mut parts = token.splitn(3, '.');
    let (run, step, secret) = (parts.next()?, parts.next()?, parts.next()?);
    (!run.is_empty() && !step.is_empty() && !secret.is_empty()).then_some((run, step, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_their_step() {
        let t = token("01a2-b3", "enrich_rows", "00ff");
        assert_eq!(parse_token(&t), Some(("01a2-b3", "enrich_rows", "00ff")));
        for bad in ["", "run", "run.step", "run..secret", ".step.secret"] {
            assert_eq!(parse_token(bad), None, "{bad:?}");
        }
    }
}
