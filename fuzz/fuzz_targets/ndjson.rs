//! Any bytes as an ingest body: no panic, the same outcome however the body is cut
//! into chunks or parallel parts, and the fast path never disagrees with the full
//! JSON parser (`milepost::ingest::invariants::check`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first two bytes choose the chunk sizes and the parallel parts; the rest is
    // the body.
    let (cuts, parts, body) = match data {
        [a, b, body @ ..] => (
            vec![usize::from(*a % 64) + 1, usize::from(*b) + 1],
            usize::from(*b % 4) + 1,
            body,
        ),
        _ => (vec![1], 1, data),
    };
    milepost::ingest::invariants::check(body, &cuts, parts);
});
