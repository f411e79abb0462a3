//! The documents carried, string-encoded, in `dataContent` (SPEC §4).
//!
//! Decoding is in [`crate::codec`]; these are plain data. Login traffic is rare next to data
//! traffic, so decoded documents own their strings.

use std::borrow::Cow;

use super::UserId;

/// Framework error code: the session is not logged in (SPEC §4.4, §9).
pub const ERROR_NOT_LOGGED_IN: i32 = 301;
/// Kickout code: another session logged in with the same uid (SPEC §4.5).
pub const KICKOUT_DUPLICATE_LOGIN: i32 = 1;
/// Kickout code: kicked by the server application / an administrator (SPEC §4.5).
pub const KICKOUT_BY_ADMIN: i32 = 2;
/// Login response code for success.
pub const LOGIN_OK: i32 = 0;
/// Framework error code "invalid message object" (SPEC §4.4's code space): imedge sends it (and
/// refuses logins with it) for a message it will not take — an id longer than the limits of
/// [`crate::message::MAX_USER_ID_LEN`] / [`crate::message::MAX_FINGERPRINT_LEN`], a message too
/// large to relay. The SDK only reports the code.
pub const ERROR_INVALID_MESSAGE: i32 = 4;
/// Codes 0–1024 are the framework's; applications refuse logins with codes from here on.
pub const FIRST_APP_CODE: i32 = 1025;

/// Type 0 `dataContent`: `{"loginUserId", "loginToken", "extra", "firstLoginTime"}` (SPEC §4.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRequest<'a> {
    /// `loginUserId`: the uid to log in as (required).
    pub user_id: UserId<'a>,
    /// `loginToken`: opaque credential for the verify step. Never log it.
    pub token: Option<Cow<'a, str>>,
    /// `extra`: opaque application data.
    pub extra: Option<Cow<'a, str>>,
    /// `firstLoginTime`: ≤ 0 on a fresh login, else the value the server gave the first login.
    pub first_login_time: i64,
}

impl LoginRequest<'_> {
    /// Detaches the document from the buffer it borrows from.
    pub fn into_owned(self) -> LoginRequest<'static> {
        LoginRequest {
            user_id: self.user_id.into_owned(),
            token: self.token.map(|t| Cow::Owned(t.into_owned())),
            extra: self.extra.map(|t| Cow::Owned(t.into_owned())),
            first_login_time: self.first_login_time,
        }
    }
}

/// Type 50 `dataContent`: `{"code", "firstLoginTime"}` (SPEC §4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginResponse {
    /// 0 = success, else the refusal code of the verify step.
    pub code: i32,
    /// On success the session's first login time (epoch ms); `-1` on failure.
    pub first_login_time: i64,
}

impl LoginResponse {
    /// A successful login whose first login time is `first_login_time`.
    pub fn ok(first_login_time: i64) -> Self {
        Self {
            code: LOGIN_OK,
            first_login_time,
        }
    }

    /// A refused login.
    pub fn refused(code: i32) -> Self {
        Self {
            code,
            first_login_time: -1,
        }
    }
}

/// Type 52 `dataContent`: `{"errorCode", "errorMsg"}` (SPEC §4.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorResponse<'a> {
    /// `errorCode`; the server only sends 301.
    pub code: i32,
    /// `errorMsg`; for 301 the re-serialized offending message.
    pub message: Option<Cow<'a, str>>,
}

impl ErrorResponse<'_> {
    /// Detaches the document from the buffer it borrows from.
    pub fn into_owned(self) -> ErrorResponse<'static> {
        ErrorResponse {
            code: self.code,
            message: self.message.map(|t| Cow::Owned(t.into_owned())),
        }
    }
}

/// Type 54 `dataContent`: `{"code", "reason"}` (SPEC §4.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kickout<'a> {
    /// 1 = duplicate login, 2 = kicked by the application.
    pub code: i32,
    /// Optional human-readable reason (omitted when `None`).
    pub reason: Option<Cow<'a, str>>,
}

impl Kickout<'_> {
    /// Detaches the document from the buffer it borrows from.
    pub fn into_owned(self) -> Kickout<'static> {
        Kickout {
            code: self.code,
            reason: self.reason.map(|t| Cow::Owned(t.into_owned())),
        }
    }
}
