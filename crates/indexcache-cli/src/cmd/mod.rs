pub mod bench;
pub mod demo;
pub mod forward;
pub mod generate;
pub mod info;
pub mod ppl;
pub mod search;
