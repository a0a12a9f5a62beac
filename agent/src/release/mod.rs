//! Everything about release directories: where they live ([`layout`]), how an upload
//! becomes one ([`unpack`]), how `current` moves ([`switch`]) and how old ones go
//! ([`prune`]).

pub mod delta;
pub mod layout;
pub mod prune;
pub mod switch;
pub mod unpack;
