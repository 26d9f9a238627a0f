//! What hits produce, beyond their counts, for people to read: the event stream.

pub mod events;
