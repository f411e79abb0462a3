//! The `type` field of the envelope (SPEC §3).

/// What a message is, from its `type` field.
///
/// Values 0–5 are sent by clients, 50–54 by the server (a convention only: data and ACKs flow in
/// both directions with the same numbers). Any other value is carried as [`Kind::Other`]: the
/// reference logs and ignores such messages, so they must decode rather than fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// 0 — `LOGIN`: `dataContent` is a [`crate::message::payload::LoginRequest`].
    Login,
    /// 1 — `KEEP_ALIVE`: `dataContent` is `"{}"`.
    KeepAlive,
    /// 2 — `COMMON_DATA`: application data, C2S (`to` = `"0"`), C2C or S2C.
    CommonData,
    /// 3 — `LOGOUT`: no `dataContent`.
    Logout,
    /// 4 — `RECIVED`: an ACK; `dataContent` is the acknowledged fingerprint.
    Ack,
    /// 5 — `ECHO`: answered with [`Kind::EchoResponse`], no login needed.
    Echo,
    /// 50 — `RESPONSE_LOGIN`: a [`crate::message::payload::LoginResponse`].
    LoginResponse,
    /// 51 — `RESPONSE_KEEP_ALIVE`: `dataContent` is `"{}"`.
    KeepAliveResponse,
    /// 52 — `RESPONSE_FOR_ERROR`: a [`crate::message::payload::ErrorResponse`].
    Error,
    /// 53 — `RESPONSE_ECHO`: the echo request sent back with only the type changed.
    EchoResponse,
    /// 54 — `KICKOUT`: a [`crate::message::payload::Kickout`].
    Kickout,
    /// Any other value; ignored by the server.
    Other(i32),
}

impl Kind {
    /// The kind for a `type` value.
    pub const fn from_code(code: i32) -> Self {
        match code {
            0 => Self::Login,
            1 => Self::KeepAlive,
            2 => Self::CommonData,
            3 => Self::Logout,
            4 => Self::Ack,
            5 => Self::Echo,
            50 => Self::LoginResponse,
            51 => Self::KeepAliveResponse,
            52 => Self::Error,
            53 => Self::EchoResponse,
            54 => Self::Kickout,
            other => Self::Other(other),
        }
    }

    /// The `type` value written on the wire.
    pub const fn code(self) -> i32 {
        match self {
            Self::Login => 0,
            Self::KeepAlive => 1,
            Self::CommonData => 2,
            Self::Logout => 3,
            Self::Ack => 4,
            Self::Echo => 5,
            Self::LoginResponse => 50,
            Self::KeepAliveResponse => 51,
            Self::Error => 52,
            Self::EchoResponse => 53,
            Self::Kickout => 54,
            Self::Other(code) => code,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for code in -3..=60 {
            assert_eq!(Kind::from_code(code).code(), code);
        }
        assert_eq!(Kind::from_code(54), Kind::Kickout);
        assert_eq!(Kind::from_code(6), Kind::Other(6));
    }
}
