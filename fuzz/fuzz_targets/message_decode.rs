//! Every message kind a service consumes, decoded from arbitrary bytes (what
//! a broker may deliver). Decoding must never panic; what decodes must
//! encode and decode again to the same message (a consumer that republishes
//! or dead-letters it must not produce something undecodable).

#![no_main]

use libfuzzer_sys::fuzz_target;
use sieve_shared::messages::{
    ControlMessage, Message, PrelabelJob, PrelabelResult, PrelabelResults, TrainEvent, TrainJob,
    decode, decode_results, encode,
};

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(message) = decode::<M>(data) {
        let again: M = decode(&encode(&message))
            .unwrap_or_else(|e| panic!("{message:?} re-encoded does not decode: {e}"));
        assert_eq!(again, message);
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<PrelabelJob>(data);
    round_trip::<PrelabelResult>(data);
    round_trip::<PrelabelResults>(data);
    let _ = decode_results(data);
    round_trip::<TrainJob>(data);
    round_trip::<TrainEvent>(data);
    round_trip::<ControlMessage>(data);
});
