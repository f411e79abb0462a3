//! Newtypes for the two kinds of identifiers on the wire: user ids and fingerprints.

use std::borrow::{Borrow, Cow};
use std::fmt;

/// A user id (`from`, `to`, `loginUserId`).
///
/// Borrowed from the receive buffer when decoded, owned when built or kept. `"0"` is the server
/// and `"-1"` means "nobody / unknown" (SPEC §2).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId<'a>(Cow<'a, str>);

/// A message fingerprint (`fp`): the message id that QoS tables are keyed by (SPEC §8.2).
///
/// The SDKs generate UUID v4 text, but any string is accepted.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint<'a>(Cow<'a, str>);

macro_rules! string_newtype {
    ($name:ident) => {
        impl<'a> $name<'a> {
            /// Wraps a string.
            pub fn new(value: impl Into<Cow<'a, str>>) -> Self {
                Self(value.into())
            }

            /// The text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The text, as the `Cow` it is stored in.
            pub fn into_inner(self) -> Cow<'a, str> {
                self.0
            }

            /// Detaches the value from the buffer it borrows from.
            pub fn into_owned(self) -> $name<'static> {
                $name(Cow::Owned(self.0.into_owned()))
            }

            /// A borrowed copy, for encoding without cloning the text.
            pub fn borrowed(&self) -> $name<'_> {
                $name(Cow::Borrowed(&self.0))
            }
        }

        impl fmt::Debug for $name<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl fmt::Display for $name<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Borrow<str> for $name<'_> {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name<'_> {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl<'a> From<&'a str> for $name<'a> {
            fn from(value: &'a str) -> Self {
                Self(Cow::Borrowed(value))
            }
        }

        impl From<String> for $name<'static> {
            fn from(value: String) -> Self {
                Self(Cow::Owned(value))
            }
        }

        impl PartialEq<str> for $name<'_> {
            fn eq(&self, other: &str) -> bool {
                *self.0 == *other
            }
        }

        impl PartialEq<&str> for $name<'_> {
            fn eq(&self, other: &&str) -> bool {
                *self.0 == **other
            }
        }
    };
}

string_newtype!(UserId);
string_newtype!(Fingerprint);

impl UserId<'static> {
    /// `"0"`: the server, as sender or recipient.
    pub const SERVER: UserId<'static> = UserId(Cow::Borrowed("0"));
    /// `"-1"`: no particular user (recipient of error and refused-login replies).
    pub const UNKNOWN: UserId<'static> = UserId(Cow::Borrowed("-1"));
}

impl UserId<'_> {
    /// Whether this is the server's id `"0"` (a C2S message when it is the recipient).
    pub fn is_server(&self) -> bool {
        &*self.0 == "0"
    }
}
