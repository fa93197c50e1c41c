//! The loop against a stand-in device: a SOCK_SEQPACKET socketpair keeps message boundaries like
//! `/dev/cachefiles` does, and ordinary temp files play the anonymous fds (their READ_COMPLETE ioctl
//! fails with ENOTTY, which the loop logs; the tests look at the written bytes instead).
#![allow(clippy::cast_possible_truncation)]

use super::*;
use crate::backend::{FillSink, Opened};
use std::io::Read;
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::mpsc;
use std::time::{Duration, Instant};

struct TestBackend {
    gate: Mutex<Option<mpsc::Receiver<()>>>,
}

struct Obj {
    name: String,
    data: Vec<u8>,
}

impl Backend for TestBackend {
    type Object = Obj;

    fn open(&self, key: &ObjectKey<'_>) -> Result<Opened<Obj>, Errno> {
        assert_eq!(key.domain, "d1");
        let size = match key.name {
            "fast" => 5000,
            "slow" => 4096,
            "broken" => 4096,
            _ => return Err(Errno::ENOENT),
        };
        let data = (0..size).map(|i| (i % 251) as u8 ^ key.name.as_bytes()[0]).collect();
        Ok(Opened { object: Obj { name: key.name.into(), data }, size: size as u64 })
    }

    fn fill(&self, obj: &Obj, range: std::ops::Range<u64>, sink: &mut dyn FillSink) -> Result<(), Errno> {
        match obj.name.as_str() {
            "slow" => {
                let rx = self.gate.lock().unwrap().take().unwrap();
                rx.recv_timeout(Duration::from_secs(10)).unwrap();
            }
            "broken" => {
                // writes half, then claims success: the frontend must notice the gap
                return sink.write_at(range.start, &obj.data[..10]);
            }
            _ => {}
        }
        // write back to front in two pieces to exercise coverage merging
        let (s, e) = (range.start as usize, range.end as usize);
        let mid = (s + e) / 2;
        sink.write_at(mid as u64, &obj.data[mid..e])?;
        sink.write_at(s as u64, &obj.data[s..mid])
    }
}

fn msg(msg_id: u32, op: u32, object_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    let len = u32::try_from(16 + payload.len()).unwrap();
    for x in [msg_id, op, len, object_id] {
        v.extend_from_slice(&x.to_ne_bytes());
    }
    v.extend_from_slice(payload);
    v
}

fn open_msg(msg_id: u32, object_id: u32, volume: &[u8], cookie: &[u8], fd: i32) -> Vec<u8> {
    let mut p = Vec::new();
    for x in [volume.len() as u32, cookie.len() as u32, fd as u32, 0] {
        p.extend_from_slice(&x.to_ne_bytes());
    }
    p.extend_from_slice(volume);
    p.extend_from_slice(cookie);
    msg(msg_id, opcode::OPEN, object_id, &p)
}

fn read_msg(msg_id: u32, object_id: u32, off: u64, len: u64) -> Vec<u8> {
    let mut p = off.to_ne_bytes().to_vec();
    p.extend_from_slice(&len.to_ne_bytes());
    msg(msg_id, opcode::READ, object_id, &p)
}

fn seqpacket_pair() -> (OwnedFd, UnixDatagram) {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (a, b) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
    // UnixDatagram gives send/recv with message boundaries on the test's end.
    (a, UnixDatagram::from(b))
}

fn anon_file() -> (tempfile::NamedTempFile, i32) {
    let f = tempfile::NamedTempFile::new().unwrap();
    let raw = f.reopen().unwrap().into_raw_fd(); // ownership goes to the loop, which adopts it
    (f, raw)
}

fn wait_for(path: &std::path::Path, len: u64) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut v = Vec::new();
        std::fs::File::open(path).unwrap().read_to_end(&mut v).unwrap();
        if v.len() as u64 >= len || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn recv_reply(sock: &UnixDatagram) -> String {
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).unwrap();
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

#[test]
fn serves_open_read_close_without_head_of_line_blocking() {
    let (dev_end, test_end) = seqpacket_pair();
    let (gate_tx, gate_rx) = mpsc::channel();
    let backend = Arc::new(TestBackend { gate: Mutex::new(Some(gate_rx)) });
    let config = Config { workers: 4, ..Config::default() };
    let mut server = Server::new(Device::from_owned_fd(dev_end), backend, config).unwrap();
    let stopper = server.stopper();
    let loop_thread = std::thread::spawn(move || server.run());

    let (slow_file, slow_fd) = anon_file();
    let (fast_file, fast_fd) = anon_file();
    test_end.send(&open_msg(1, 11, b"erofs,d1\0", b"slow", slow_fd)).unwrap();
    test_end.send(&open_msg(2, 12, b"erofs,d1\0", b"fast", fast_fd)).unwrap();
    let mut replies = vec![recv_reply(&test_end), recv_reply(&test_end)];
    replies.sort();
    assert_eq!(replies, ["copen 1,4096", "copen 2,5000"]);

    // The slow READ blocks a worker; the fast one must complete meanwhile.
    test_end.send(&read_msg(3, 11, 0, 4096)).unwrap();
    test_end.send(&read_msg(4, 12, 0, 8192)).unwrap();
    let fast = wait_for(fast_file.path(), 8192);
    assert_eq!(fast.len(), 8192, "fast READ was not served while the slow one was pending");
    let want: Vec<u8> = (0..5000).map(|i| (i % 251) as u8 ^ b'f').collect();
    assert_eq!(&fast[..5000], &want[..]);
    assert!(fast[5000..].iter().all(|&b| b == 0), "tail past the object end must be zeros");
    assert_eq!(std::fs::metadata(slow_file.path()).unwrap().len(), 0);
    gate_tx.send(()).unwrap();
    let slow = wait_for(slow_file.path(), 4096);
    assert_eq!(slow.len(), 4096);

    // Unknown cookie, non-EROFS volume and a malformed OPEN are refused with an errno.
    let (_f, fd) = anon_file();
    test_end.send(&open_msg(5, 13, b"erofs,d1\0", b"nope", fd)).unwrap();
    assert_eq!(recv_reply(&test_end), "copen 5,-2");
    let (_f, fd) = anon_file();
    test_end.send(&open_msg(6, 14, b"nfs,x\0", b"fast", fd)).unwrap();
    assert_eq!(recv_reply(&test_end), "copen 6,-22");
    let (_f, fd) = anon_file();
    test_end.send(&open_msg(7, 15, b"erofs,d1", b"fast", fd)).unwrap();
    assert_eq!(recv_reply(&test_end), "copen 7,-22");

    // A backend that leaves a gap writes nothing (the kernel would then fail the reader with EIO).
    let (broken_file, fd) = anon_file();
    test_end.send(&open_msg(8, 16, b"erofs,d1\0", b"broken", fd)).unwrap();
    assert_eq!(recv_reply(&test_end), "copen 8,4096");
    test_end.send(&read_msg(9, 16, 0, 4096)).unwrap();
    // CLOSE then an unaligned READ of the fast object, which is still open: the whole window is filled.
    test_end.send(&read_msg(10, 12, 4096 + 100, 10)).unwrap();
    test_end.send(&msg(11, opcode::CLOSE, 16, &[])).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(std::fs::metadata(broken_file.path()).unwrap().len(), 0);

    stopper.stop();
    loop_thread.join().unwrap().unwrap();
}
