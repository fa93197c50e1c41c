//! Layer changesets: OCI image layers (tar archives of changes, image-spec `layer.md`, "Layer
//! Changesets") parsed member by member and applied in order onto one [`erofs::tree::Tree`].
//!
//! The name is the image spec's for what a layer is: a changeset over the layers below it. It is
//! not `tree` (that is [`erofs::tree`], the model this module builds) nor `layers` (that is
//! [`crate::convert::layers`], which fetches and decompresses the layer blobs this module parses).
//!
//! - [`entry`] turns one tar member (ustar, PAX, GNU; long names, PAX xattrs, sparse members) into a
//!   validated [`entry::Entry`];
//! - [`tarstream`] reads tar members with bounded extension headers, [`sparse`] expands sparse
//!   members;
//! - [`merge`] applies entries to the tree with the spec's whiteout, opaque-directory and
//!   replacement rules;
//! - [`limits`] bounds what a hostile layer may cost.
//!
//! File contents never pass through here: the caller streams them and hands the merge a
//! [`erofs::tree::FileData`].

pub mod entry;
pub mod limits;
pub mod merge;
pub mod sparse;
pub mod tarstream;

/// Longest file name component Linux accepts (NAME_MAX).
pub const NAME_MAX: usize = 255;
/// Longest path (PATH_MAX, including the terminating NUL in the kernel's count).
pub const PATH_MAX: usize = 4095;

/// A member name that cannot be placed in a tree.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("absolute name")]
    Absolute,
    #[error("`..` component (path traversal)")]
    DotDot,
    #[error("NUL byte in name")]
    Nul,
    #[error("component of {0} bytes (NAME_MAX is 255)")]
    ComponentTooLong(usize),
    #[error("name of {0} bytes (PATH_MAX is 4095)")]
    TooLong(usize),
}

/// Splits a tar member name into its components, relative to the image root: a leading `./` and a
/// trailing `/` are dropped, empty and `.` components are skipped. The root itself is the empty list.
pub fn split_name(name: &[u8]) -> Result<Vec<Vec<u8>>, PathError> {
    if name.len() > PATH_MAX {
        return Err(PathError::TooLong(name.len()));
    }
    if name.contains(&0) {
        return Err(PathError::Nul);
    }
    if name.first() == Some(&b'/') {
        return Err(PathError::Absolute);
    }
    let mut out = Vec::new();
    for c in name.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(PathError::DotDot),
            c if c.len() > NAME_MAX => return Err(PathError::ComponentTooLong(c.len())),
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

/// A path for messages: components joined with `/`, non-UTF-8 bytes escaped.
pub fn show(components: &[Vec<u8>]) -> String {
    let joined: Vec<u8> = components.join(&b'/');
    show_bytes(&joined)
}

/// Bytes for messages, non-UTF-8 bytes escaped; very long names are shortened.
pub fn show_bytes(b: &[u8]) -> String {
    if b.len() > 300 {
        return format!("{}...({} bytes)", b[..200].escape_ascii(), b.len());
    }
    b.escape_ascii().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_and_normalize() {
        assert_eq!(split_name(b"./a//b/./c/").unwrap(), vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        assert_eq!(split_name(b"./").unwrap(), Vec::<Vec<u8>>::new());
        assert_eq!(split_name(b"/etc/passwd"), Err(PathError::Absolute));
        assert_eq!(split_name(b"a/../../etc"), Err(PathError::DotDot));
        assert_eq!(split_name(b"../x"), Err(PathError::DotDot));
        assert_eq!(split_name(&[b'n'; 256]), Err(PathError::ComponentTooLong(256)));
        assert!(split_name(&[b'n'; 255]).is_ok());
        assert_eq!(split_name(&[b'a'; 5000]), Err(PathError::TooLong(5000)));
    }
}
