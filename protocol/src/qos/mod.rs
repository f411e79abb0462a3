//! Acknowledged delivery (SPEC §8): a sender's resend table and a receiver's de-duplication window.
