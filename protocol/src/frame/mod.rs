//! Transport framing: where one message body starts and ends on each transport (SPEC §1).
//!
//! Every framer is incremental and sans-IO: it looks at the bytes received so far and either
//! returns a complete unit, asks for more (consuming nothing), or fails with a typed error that
//! closes only that session.

pub mod tcp;
pub mod udp;
pub mod ws;
