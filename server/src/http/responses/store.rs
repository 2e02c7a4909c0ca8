//! Stored responses: what `previous_response_id` continues. In memory, per API key, bounded
//! (the oldest go first); a server restart forgets them, as it forgets everything else.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use serde_json::Value;

use crate::http::error::ApiError;

/// Responses kept at most; each holds its conversation's messages (text only).
pub const STORED_RESPONSES: usize = 1024;

struct Stored {
    /// The API key name that made it (`None` without keys): only that key may continue it.
    owner: Option<String>,
    /// The conversation up to and including this response's answer, without instructions.
    messages: Vec<Value>,
}

#[derive(Default)]
pub struct ResponseStore {
    inner: Mutex<(HashMap<String, Stored>, VecDeque<String>)>,
}

impl ResponseStore {
    /// The conversation of response `id`, if `owner` stored it.
    pub fn conversation(&self, id: &str, owner: Option<&str>) -> Result<Vec<Value>, ApiError> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match inner.0.get(id) {
            Some(s) if s.owner.as_deref() == owner => Ok(s.messages.clone()),
            // Another key's response is as absent as one never stored.
            _ => Err(ApiError::invalid(
                "previous_response_id",
                format!(
                    "no stored response `{id}`: it was made with `store: false`, by another key, \
                     or dropped (the server keeps the last {STORED_RESPONSES}, in memory)"
                ),
            )),
        }
    }

    /// Keeps a response's conversation, dropping the oldest beyond [`STORED_RESPONSES`].
    pub fn keep(&self, id: String, owner: Option<String>, messages: Vec<Value>) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let (map, order) = &mut *inner;
        map.insert(id.clone(), Stored { owner, messages });
        order.push_back(id);
        while order.len() > STORED_RESPONSES {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_response_is_continued_only_by_its_key_and_the_oldest_go_first() {
        let store = ResponseStore::default();
        store.keep(
            "a".into(),
            Some("alice".into()),
            vec![json!({"role": "user"})],
        );
        assert_eq!(store.conversation("a", Some("alice")).unwrap().len(), 1);
        assert!(store.conversation("a", Some("bob")).is_err());
        assert!(store.conversation("a", None).is_err());
        for i in 0..STORED_RESPONSES {
            store.keep(format!("r{i}"), None, Vec::new());
        }
        assert!(store.conversation("a", Some("alice")).is_err(), "dropped");
        assert!(store.conversation("r0", None).is_ok());
    }
}
