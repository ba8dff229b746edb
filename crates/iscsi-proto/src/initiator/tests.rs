//! [`DataIn`]: the segments of a read, and the few ways to get them out.

use bytes::Bytes;

use super::DataIn;

fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

/// Three segments cut from one buffer, and the buffer.
fn three() -> (DataIn, Bytes) {
    let whole = pattern(3000, 1);
    let d: DataIn = [
        whole.slice(..1000),
        whole.slice(1000..1024),
        whole.slice(1024..),
    ]
    .into_iter()
    .collect();
    (d, whole)
}

#[test]
fn empty() {
    let d = DataIn::default();
    assert!(d.is_empty());
    assert_eq!(d.len(), 0);
    assert!(d.segments().is_empty());
    assert_eq!(d.iter().count(), 0);
    assert!(d.to_bytes().is_empty());
    assert!(d.clone().into_bytes().is_empty());
    assert_eq!(d, DataIn::new());
    assert_eq!(d, &[][..]);
    d.copy_to_slice(&mut []);
    // Empty segments are not kept.
    let mut d = DataIn::from(Bytes::new());
    d.push(Bytes::new());
    assert!(d.segments().is_empty() && d.is_empty());
}

#[test]
fn one_segment_to_bytes_is_the_segment_itself() {
    let b = pattern(4096, 3);
    let d = DataIn::from(b.clone());
    assert_eq!((d.len(), d.segments().len()), (4096, 1));
    assert_eq!(d.segments()[0].as_ptr(), b.as_ptr());
    let out = d.to_bytes();
    assert_eq!(out.as_ptr(), b.as_ptr(), "no copy for one segment");
    assert_eq!(out, b);
    let out = d.into_bytes();
    assert_eq!((out.as_ptr(), out.len()), (b.as_ptr(), b.len()));
}

#[test]
fn several_segments_to_bytes_concatenates() {
    let (d, whole) = three();
    assert_eq!((d.len(), d.segments().len()), (3000, 3));
    assert!(!d.is_empty());
    let lens: Vec<usize> = d.iter().map(<[u8]>::len).collect();
    assert_eq!(lens, [1000, 24, 1976]);
    assert_eq!(d.iter().next_back().unwrap().len(), 1976);
    assert_eq!(d.iter().len(), 3);
    // The segments are the slices pushed, not copies.
    assert_eq!(d.segments()[1].as_ptr(), whole[1000..].as_ptr());
    assert_eq!(d.to_bytes(), whole);
    assert_eq!(d.clone().into_bytes(), whole);
    let chunks: Vec<u8> = (&d).into_iter().flatten().copied().collect();
    assert_eq!(chunks, whole);
}

#[test]
fn copy_to_slice_fills_the_front() {
    let (d, whole) = three();
    let mut exact = vec![0u8; 3000];
    d.copy_to_slice(&mut exact);
    assert_eq!(exact, whole);
    // A longer buffer (a read answered short): the tail is left alone.
    let mut longer = vec![0xeeu8; 4000];
    d.copy_to_slice(&mut longer);
    assert_eq!(&longer[..3000], &whole[..]);
    assert!(longer[3000..].iter().all(|&b| b == 0xee));
}

#[test]
#[should_panic(expected = "3000 bytes of data into 2999 bytes")]
fn copy_to_slice_into_a_short_buffer_panics() {
    let (d, _) = three();
    d.copy_to_slice(&mut [0u8; 2999]);
}

#[test]
fn equality_is_by_content_not_by_cut() {
    let (d, whole) = three();
    assert_eq!(d, whole);
    assert_eq!(d, whole[..]);
    assert_eq!(d, &whole[..]);
    assert_eq!(d, DataIn::from(whole.clone()));
    let other_cut: DataIn = [whole.slice(..1), whole.slice(1..2999), whole.slice(2999..)]
        .into_iter()
        .collect();
    assert_eq!(d, other_cut);
    // Different content, or length, at either end or in the middle.
    assert_ne!(d, whole[..2999]);
    assert_ne!(d, DataIn::from(whole.slice(1..)));
    let mut changed = whole.to_vec();
    changed[1010] ^= 1;
    assert_ne!(d, changed[..]);
    let mut longer = d.clone();
    longer.push(Bytes::from_static(b"x"));
    assert_ne!(d, longer);
    assert_eq!(longer.len(), 3001);
}

#[test]
fn debug_shows_sizes_not_contents() {
    let (d, _) = three();
    assert_eq!(format!("{d:?}"), "DataIn { len: 3000, segments: 3 }");
}
