//! The echo benchmark ("physical limit"): how much server CPU one echoed frame costs on imedge's
//! io_uring loop, its epoll loop and a plain tokio server, all driven by the same client
//! (`echo-load`) and measured the same way. This module holds what the client and the tokio
//! server share and can be tested without sockets: the wire format, the open-loop schedule and
//! the `/proc/<pid>/stat` CPU reader.

pub mod proc_stat;
pub mod schedule;
pub mod wire;
