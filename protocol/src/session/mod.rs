//! Client session logic: login, keep-alive by sense mode, automatic re-login (SPEC §5, §6).
