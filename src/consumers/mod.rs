//! What hits produce, beyond their counts, for people to read: the event stream, and the stacks.

pub mod events;
pub mod stacks;
