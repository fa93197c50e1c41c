//! Pure parsing of what `read(2)` returns from a fanotify group: `struct fanotify_event_metadata`
//! records followed by info records (`include/uapi/linux/fanotify.h`, 6.14+ for the range record).
//! Host-endian, like every fanotify field.

use std::ops::Range;

use zerocopy::byteorder::{NativeEndian, I32, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

/// `FANOTIFY_METADATA_VERSION`.
pub const METADATA_VERSION: u8 = 3;

/// `FAN_EVENT_INFO_TYPE_RANGE` (6.14+): offset and count of the access that raised a pre-content event.
pub const INFO_TYPE_RANGE: u8 = 6;

/// `struct fanotify_event_metadata`.
#[derive(Debug, Clone, Copy, FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawMetadata {
    /// Length of this event including info records.
    pub event_len: U32<NativeEndian>,
    /// Must be [`METADATA_VERSION`].
    pub vers: u8,
    /// Unused.
    pub reserved: u8,
    /// Length of this struct.
    pub metadata_len: U16<NativeEndian>,
    /// Event bits.
    pub mask: U64<NativeEndian>,
    /// An fd opened on the object, or `FAN_NOFD` (-1).
    pub fd: I32<NativeEndian>,
    /// Pid (or tid) of the accessing task.
    pub pid: I32<NativeEndian>,
}
const _: () = assert!(size_of::<RawMetadata>() == 24);

/// `struct fanotify_event_info_header`.
#[derive(Debug, Clone, Copy, FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawInfoHeader {
    /// `FAN_EVENT_INFO_TYPE_*`.
    pub info_type: u8,
    /// Unused.
    pub pad: u8,
    /// Length of the record including this header.
    pub len: U16<NativeEndian>,
}
const _: () = assert!(size_of::<RawInfoHeader>() == 4);

/// `struct fanotify_event_info_range`.
#[derive(Debug, Clone, Copy, FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawRange {
    /// Record header.
    pub hdr: RawInfoHeader,
    /// Unused.
    pub pad: U32<NativeEndian>,
    /// Start of the access.
    pub offset: U64<NativeEndian>,
    /// Length of the access.
    pub count: U64<NativeEndian>,
}
const _: () = assert!(size_of::<RawRange>() == 24);

/// A parsed event; the fd is still a number (sys adopts it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    /// Event bits.
    pub mask: u64,
    /// fd number or a negative value (no fd).
    pub fd: i32,
    /// Accessing pid.
    pub pid: i32,
    /// Accessed range, for pre-content events.
    pub range: Option<Range<u64>>,
}

/// Malformed event data; the offset is within the read buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// Fewer bytes than a header.
    #[error("fanotify event at {at}: {left} bytes left, too short for a header")]
    Short { at: usize, left: usize },
    /// Unknown metadata version.
    #[error("fanotify event at {at}: metadata version {vers}, expected {METADATA_VERSION}")]
    Version { at: usize, vers: u8 },
    /// Lengths that do not fit the buffer or each other.
    #[error("fanotify event at {at}: event_len {event_len}, metadata_len {metadata_len}, {left} bytes left")]
    Length { at: usize, event_len: u32, metadata_len: u16, left: usize },
    /// A malformed info record.
    #[error("fanotify info record at {at}: bad length {len}")]
    Info { at: usize, len: u16 },
    /// A range whose end overflows.
    #[error("fanotify range record at {at}: {offset}+{count} overflows")]
    Range { at: usize, offset: u64, count: u64 },
}

/// Parses a whole read buffer. Events before a malformed one are returned together with the error, so
/// their fds can still be adopted and answered.
pub fn parse(buf: &[u8]) -> (Vec<RawEvent>, Option<EventError>) {
    let mut events = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        match parse_one(buf, at) {
            Ok((event, len)) => {
                events.push(event);
                at += len;
            }
            Err(e) => return (events, Some(e)),
        }
    }
    (events, None)
}

fn parse_one(buf: &[u8], at: usize) -> Result<(RawEvent, usize), EventError> {
    let rest = &buf[at..];
    let left = rest.len();
    let (meta, _) = RawMetadata::read_from_prefix(rest).map_err(|_| EventError::Short { at, left })?;
    if meta.vers != METADATA_VERSION {
        return Err(EventError::Version { at, vers: meta.vers });
    }
    let (event_len, metadata_len) = (meta.event_len.get(), meta.metadata_len.get());
    let bad_len = EventError::Length { at, event_len, metadata_len, left };
    let len = usize::try_from(event_len).map_err(|_| bad_len.clone())?;
    let mlen = usize::from(metadata_len);
    if mlen < size_of::<RawMetadata>() || mlen > len || len > left {
        return Err(bad_len);
    }
    let mut range = None;
    let mut i = mlen;
    while i < len {
        let rec_at = at + i;
        let (hdr, _) = RawInfoHeader::read_from_prefix(&rest[i..len])
            .map_err(|_| EventError::Short { at: rec_at, left: len - i })?;
        let rlen = usize::from(hdr.len.get());
        if rlen < size_of::<RawInfoHeader>() || rlen > len - i {
            return Err(EventError::Info { at: rec_at, len: hdr.len.get() });
        }
        if hdr.info_type == INFO_TYPE_RANGE {
            let (r, _) = RawRange::read_from_prefix(&rest[i..i + rlen])
                .map_err(|_| EventError::Info { at: rec_at, len: hdr.len.get() })?;
            let (offset, count) = (r.offset.get(), r.count.get());
            let end = offset.checked_add(count).ok_or(EventError::Range { at: rec_at, offset, count })?;
            range = Some(offset..end);
        }
        i += rlen;
    }
    let event = RawEvent { mask: meta.mask.get(), fd: meta.fd.get(), pid: meta.pid.get(), range };
    Ok((event, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(mask: u64, fd: i32, range: Option<(u64, u64)>) -> Vec<u8> {
        let len: u32 = if range.is_some() { 48 } else { 24 };
        let mut v = Vec::new();
        v.extend_from_slice(&len.to_ne_bytes());
        v.extend_from_slice(&[METADATA_VERSION, 0]);
        v.extend_from_slice(&24u16.to_ne_bytes());
        v.extend_from_slice(&mask.to_ne_bytes());
        v.extend_from_slice(&fd.to_ne_bytes());
        v.extend_from_slice(&1234i32.to_ne_bytes());
        if let Some((off, count)) = range {
            v.extend_from_slice(&[INFO_TYPE_RANGE, 0]);
            v.extend_from_slice(&24u16.to_ne_bytes());
            v.extend_from_slice(&0u32.to_ne_bytes());
            v.extend_from_slice(&off.to_ne_bytes());
            v.extend_from_slice(&count.to_ne_bytes());
        }
        v
    }

    #[test]
    fn parses_events_with_ranges() {
        let mut buf = event(0x0010_0000, 7, Some((4096, 8192)));
        buf.extend(event(0x4000, -1, None));
        let (events, err) = parse(&buf);
        assert_eq!(err, None);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0], RawEvent { mask: 0x0010_0000, fd: 7, pid: 1234, range: Some(4096..12288) });
        assert_eq!(events[1].fd, -1);
        assert_eq!(events[1].range, None);
    }

    #[test]
    fn keeps_good_events_before_a_bad_one() {
        let mut buf = event(1, 5, None);
        let mut bad = event(1, 6, Some((0, 1)));
        bad[26..28].copy_from_slice(&2u16.to_ne_bytes()); // info record length below its header size
        buf.extend(bad);
        let (events, err) = parse(&buf);
        assert_eq!(events.len(), 1);
        assert!(matches!(err, Some(EventError::Info { at: 48, len: 2 })));
        let mut v = event(1, 5, None);
        v[4] = 2;
        assert!(matches!(parse(&v).1, Some(EventError::Version { .. })));
        let mut v = event(1, 5, None);
        v[0..4].copy_from_slice(&100u32.to_ne_bytes());
        assert!(matches!(parse(&v).1, Some(EventError::Length { .. })));
        assert!(matches!(parse(&v[..10]).1, Some(EventError::Short { .. })));
        let overflow = event(1, 5, Some((u64::MAX, 2)));
        assert!(matches!(parse(&overflow).1, Some(EventError::Range { .. })));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse(&buf);
        }

        #[test]
        fn mutated_events_never_panic(pos in 0usize..48, byte in any::<u8>()) {
            let mut buf = event(0x0010_0000, 3, Some((0, 4096)));
            buf[pos] = byte;
            let _ = parse(&buf);
        }
    }
}
