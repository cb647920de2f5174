//! The fault campaign's parts (tests/torture.rs runs it): a seeded PRNG, the model of what
//! was written and what may survive, one trial's processes, and the trial driver.

pub mod faults;
pub mod model;
pub mod rng;
pub mod site;
pub mod trial;
