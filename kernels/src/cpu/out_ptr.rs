//! A raw output pointer that rayon tasks may share, for kernels whose tasks write disjoint
//! parts of one output buffer.

/// Shared by the tasks of one kernel call; each writes only the output elements it owns.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(*mut f32);

// SAFETY: the kernels hand each task a disjoint set of output elements to write and read
// nothing through the pointer, so sending or sharing it across threads cannot race.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    pub(super) fn new(out: &mut [f32]) -> Self {
        OutPtr(out.as_mut_ptr())
    }

    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}
