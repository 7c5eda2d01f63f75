//! Session time as one stretch: the one place where charged intervals are merged.

/// A stretch of session time, in monotonic milliseconds: from the first request's start to the
/// last one's end, gaps between requests included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    pub from: i64,
    pub to: i64,
}

impl Span {
    pub fn len(self) -> i64 {
        self.to - self.from
    }
}

/// Widens `span` to cover `[from, to]` and returns how much longer it became: the session time
/// that covering it adds.
pub(crate) fn cover(span: &mut Option<Span>, from: i64, to: i64) -> i64 {
    let to = to.max(from);
    match span {
        None => {
            *span = Some(Span { from, to });
            to - from
        }
        Some(s) => {
            let before = s.len();
            s.from = s.from.min(from);
            s.to = s.to.max(to);
            s.len() - before
        }
    }
}

/// The length of an optional span (none is nothing).
pub(crate) fn len(span: Option<Span>) -> i64 {
    span.map_or(0, Span::len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covering_grows_a_span_by_what_lies_outside_it() {
        let mut s = None;
        assert_eq!(cover(&mut s, 10, 20), 10);
        assert_eq!(cover(&mut s, 12, 18), 0, "inside: nothing added");
        assert_eq!(cover(&mut s, 25, 30), 10, "the gap up to it counts");
        assert_eq!(cover(&mut s, 5, 11), 5, "an earlier start widens it back");
        assert_eq!(s, Some(Span { from: 5, to: 30 }));
        assert_eq!(
            cover(&mut s, 40, 35),
            10,
            "an end before the start is the start"
        );
        assert_eq!(len(s), 35);
        assert_eq!(len(None), 0);
    }
}
