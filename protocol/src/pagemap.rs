//! Per-page state of a node, dense: pages are grouped in chunks (a block
//! of the pod, or the whole guest when it is smaller), a chunk is
//! allocated the first time one of its pages leaves the default state,
//! and a page's entry is found by indexing, not by a search. A node keeps
//! an entry for every page it touched (and every page it is home to that
//! a node touched), so a lookup on the fault path must cost what an array
//! access costs; a tree of a million entries cost the fault path as much
//! as the kernel's zero-fill did.
//!
//! Two maps are equal, and hash alike, when they hold the same pages
//! outside the default state, whatever chunks they allocated: the model
//! checker compares states by content.

use std::hash::{Hash, Hasher};

use crate::Page;

#[derive(Clone, Debug)]
pub(crate) struct PageMap<T> {
    chunk: u64,
    pages: u64,
    chunks: Vec<Option<Box<[T]>>>,
}

impl<T: Clone + Default + PartialEq> PageMap<T> {
    /// A map of `pages` pages in chunks of `chunk` (at least 1) pages,
    /// every page in the default state.
    pub(crate) fn new(pages: u64, chunk: u64) -> Self {
        let chunk = chunk.clamp(1, pages.max(1));
        let n = pages.div_ceil(chunk) as usize;
        // vec! of None allocates zeroed memory (None is a null pointer): the
        // kernel backs only the pages of it that chunks are set in
        PageMap { chunk, pages, chunks: vec![None; n] }
    }

    /// The entry of `page` (the default one where none was set, and
    /// outside the map).
    pub(crate) fn get(&self, page: Page) -> T {
        let entry =
            self.chunks.get((page / self.chunk) as usize).and_then(|c| c.as_deref()).filter(|_| page < self.pages);
        entry.map_or_else(T::default, |c| c[(page % self.chunk) as usize].clone())
    }

    /// The entry of `page` without a copy; None where its chunk holds
    /// nothing yet (the entry is the default one).
    pub(crate) fn peek(&self, page: Page) -> Option<&T> {
        let c = self.chunks.get((page / self.chunk) as usize)?.as_deref().filter(|_| page < self.pages)?;
        Some(&c[(page % self.chunk) as usize])
    }

    /// The entry of `page` to change in place (allocating its chunk). The
    /// page must be inside the map: callers check pages first.
    pub(crate) fn get_mut(&mut self, page: Page) -> &mut T {
        assert!(page < self.pages, "page {page} outside a map of {} pages", self.pages);
        let (c, i) = ((page / self.chunk) as usize, (page % self.chunk) as usize);
        let len = self.chunk.min(self.pages - c as u64 * self.chunk) as usize;
        let entries = self.chunks[c].get_or_insert_with(|| (0..len).map(|_| T::default()).collect());
        &mut entries[i]
    }

    /// Sets the entry of `page` (the default value clears it). Pages
    /// outside the map are ignored: callers check pages first.
    pub(crate) fn set(&mut self, page: Page, value: T) {
        if page >= self.pages {
            debug_assert!(false, "page {page} outside a map of {} pages", self.pages);
            return;
        }
        let (c, i) = ((page / self.chunk) as usize, (page % self.chunk) as usize);
        let slot = &mut self.chunks[c];
        match slot {
            Some(entries) => entries[i] = value,
            None if value == T::default() => {}
            None => {
                let len = self.chunk.min(self.pages - c as u64 * self.chunk) as usize;
                let mut entries: Box<[T]> = (0..len).map(|_| T::default()).collect();
                entries[i] = value;
                *slot = Some(entries);
            }
        }
    }

    /// The pages not in the default state, in page order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (Page, &T)> + '_ {
        let default = T::default();
        self.chunks.iter().enumerate().flat_map(move |(c, entries)| {
            let default = default.clone();
            entries
                .iter()
                .flat_map(|e| e.iter())
                .enumerate()
                .filter_map(move |(i, v)| (*v != default).then_some((c as u64 * self.chunk + i as u64, v)))
        })
    }
}

impl<T: Clone + Default + PartialEq> PartialEq for PageMap<T> {
    fn eq(&self, other: &Self) -> bool {
        self.pages == other.pages && self.iter().eq(other.iter())
    }
}

impl<T: Clone + Default + Eq> Eq for PageMap<T> {}

impl<T: Clone + Default + PartialEq + Hash> Hash for PageMap<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.pages.hash(state);
        for (page, v) in self.iter() {
            page.hash(state);
            v.hash(state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::hash_map::DefaultHasher;

    fn hash_of(m: &PageMap<u32>) -> u64 {
        let mut h = DefaultHasher::new();
        m.hash(&mut h);
        h.finish()
    }

    #[test]
    fn entries_are_found_where_they_were_set_and_default_ones_are_absent() {
        let mut m = PageMap::<u32>::new(1000, 512);
        assert_eq!(m.get(7), 0);
        m.set(7, 3);
        m.set(999, 4);
        assert_eq!((m.get(7), m.get(999), m.get(8), m.get(1000)), (3, 4, 0, 0));
        m.set(7, 0);
        assert_eq!(m.get(7), 0, "the default value clears");
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![(999, &4)]);
        assert_eq!((m.peek(999), m.peek(7)), (Some(&4), Some(&0)));
        let mut fresh = PageMap::<u32>::new(1000, 512);
        assert_eq!(fresh.peek(100), None);
        *fresh.get_mut(100) += 2;
        assert_eq!((fresh.get(100), fresh.peek(101)), (2, Some(&0)));
    }

    #[test]
    fn maps_with_the_same_entries_are_equal_whatever_they_allocated() {
        let mut a = PageMap::<u32>::new(1000, 512);
        let b = PageMap::<u32>::new(1000, 512);
        a.set(3, 1);
        a.set(3, 0); // a's first chunk is allocated, all default
        assert_eq!(a, b);
        assert_eq!(hash_of(&a), hash_of(&b));
        a.set(600, 2);
        assert_ne!(a, b);
        let mut c = b.clone();
        c.set(600, 2);
        assert_eq!(a, c);
        assert_eq!(hash_of(&a), hash_of(&c));
    }

    #[test]
    fn a_map_smaller_than_a_chunk_is_one_short_chunk() {
        let mut m = PageMap::<u32>::new(2, 512);
        m.set(1, 9);
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![(1, &9)]);
        assert_eq!(m.chunks.len(), 1);
        assert_eq!(m.chunks[0].as_ref().map(|c| c.len()), Some(2));
    }
}
