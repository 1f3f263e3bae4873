//! Bad messages never crash the decoder: thousands of mutated copies of a
//! real task either decode to a task that passes validation or come back as
//! a `RejectReason` with a code (reliability catalog: "worker survives 1,000
//! fuzzed messages"). Deterministic: a fixed-seed xorshift generator.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use sandfleet_proto::{Limits, decode_task};

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[&[u8]] = &[
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"null",
    b"-1",
    b"0",
    b"1e999",
    b"\\u0000",
    b"..",
    b"/",
    b"\xff",
    b"\"schema_version\":2,",
    b"99999999999999999999999",
];

fn mutate(rng: &mut XorShift, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(3) {
        let at = rng.below(out.len());
        match rng.below(4) {
            0 => out[at] = rng.next() as u8,
            1 => {
                let end = (at + rng.below(64)).min(out.len());
                out.drain(at..end);
            }
            2 => {
                let piece = INTERESTING[rng.below(INTERESTING.len())];
                out.splice(at..at, piece.iter().copied());
            }
            _ => out.truncate(at),
        }
        if out.is_empty() {
            break;
        }
    }
    out
}

#[test]
fn mutated_messages_are_decoded_or_rejected_never_a_panic() {
    let original = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/tasks/python-fix-attempt.json"
    ))
    .unwrap();
    let limits = Limits::default();
    let mut rng = XorShift(0x5eed_f1ee_7000_0001);
    let mut codes: BTreeMap<&'static str, usize> = BTreeMap::new();
    for _ in 0..3000 {
        let message = mutate(&mut rng, &original);
        match decode_task(&message, &limits) {
            Ok(task) => {
                assert!(task.validate(&limits).is_ok());
                *codes.entry("ok").or_default() += 1;
            }
            Err(reason) => {
                assert!(!reason.to_string().is_empty());
                *codes.entry(reason.code()).or_default() += 1;
            }
        }
    }
    // The mutations reach every stage of the decoder.
    for code in ["malformed_json", "invalid"] {
        assert!(
            codes.get(code).copied().unwrap_or(0) > 10,
            "{code} barely exercised: {codes:?}"
        );
    }
}

#[test]
fn deeply_nested_json_is_rejected_not_a_stack_overflow() {
    let mut message = b"{\"schema_version\":1,\"labels\":".to_vec();
    message.extend(std::iter::repeat_n(b'[', 100_000));
    let limits = Limits {
        max_message_bytes: 1 << 20,
        ..Limits::default()
    };
    assert_eq!(
        decode_task(&message, &limits).unwrap_err().code(),
        "malformed_json"
    );
}
