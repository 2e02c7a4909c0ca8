//! An incremental server-sent-events parser: bytes in, in whatever pieces the network delivers
//! them, the `data` of each complete event out.
//!
//! It follows the SSE rules the OpenAI-compatible servers use: events end at a blank line,
//! several `data:` lines join with `\n`, one space after the colon is dropped, `:` lines are
//! comments (keep-alives), other fields (`event:`, `id:`) are ignored. Lines end in `\n` or
//! `\r\n`; a lone `\r` as a line end, which no LLM server sends, is not supported.

#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes after the last complete line.
    pending: Vec<u8>,
    /// `data` lines of the event being read.
    data: Option<String>,
}

impl SseParser {
    /// Feeds `bytes` and returns the data of every event they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut consumed = 0;
        while let Some(nl) = self.pending[consumed..].iter().position(|&b| b == b'\n') {
            let end = consumed + nl;
            let mut line = &self.pending[consumed..end];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            let line = String::from_utf8_lossy(line).into_owned();
            consumed = end + 1;
            if let Some(event) = self.line(&line) {
                events.push(event);
            }
        }
        self.pending.drain(..consumed);
        events
    }

    /// Handles one line; returns an event's data when the line ends it.
    fn line(&mut self, line: &str) -> Option<String> {
        if line.is_empty() {
            return self.data.take();
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        if field == "data" {
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_anywhere_come_out_whole() {
        let text = b"data: {\"a\":1}\n\n: keep-alive\n\nevent: x\ndata: one\ndata: two\r\n\r\ndata: [DONE]\n\n";
        for cut in 0..text.len() {
            let mut p = SseParser::default();
            let mut got = p.push(&text[..cut]);
            got.extend(p.push(&text[cut..]));
            assert_eq!(got, vec!["{\"a\":1}", "one\ntwo", "[DONE]"], "cut at {cut}");
        }
    }

    #[test]
    fn an_unterminated_event_is_not_emitted() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: x\n").is_empty());
        assert_eq!(p.push(b"\n"), vec!["x"]);
    }
}
