//! What the fuzz targets share: damage to a directory of files, for the targets that check
//! that the agent's queue and the hub's spool recover from whatever a disk holds.

pub mod disk;
