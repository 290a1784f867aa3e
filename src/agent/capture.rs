//! Where the agent's key events come from: an evdev keyboard, or a keylog file replayed through
//! the same path.
//!
//! Each source runs on its own thread and hands [`SourceItem`]s to the agent's loop over a
//! channel; everything after that (key labels, cutting, spool, producer) is shared, so the replay
//! source exercises the whole agent on machines without input devices. The mapping of raw input
//! events ([`map_input`]) is pure and tested on its own; only the ioctl layer (opening and
//! reading `/dev/input/event*`) needs a real device.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant, SystemTime};

use metronome_core::event::KeyAction;
use metronome_core::keylog::{KeylogReader, MAX_KEY_CODE};
use tokio_util::sync::CancellationToken;

/// One key event as captured, before its key is replaced by a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapturedKey {
    /// Capture time, microseconds since the Unix epoch.
    pub time_us: i64,
    /// The raw evdev key code. Never leaves the agent.
    pub code: u16,
    /// Down, up or auto-repeat.
    pub action: KeyAction,
}

/// What a source reports to the agent's loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceItem {
    /// A key event.
    Key(CapturedKey),
    /// The kernel's buffer overflowed (`SYN_DROPPED`): events were lost before the agent saw them.
    KernelDropped,
    /// The device went away (unplugged) or none is there yet: the source waits for one.
    DeviceLost,
    /// A device is open and being read (again).
    DeviceReady {
        /// A stable, content-free id of the device (vendor, product and name hashed).
        device_id: String,
        /// Where its keys come from; `None` for a replayed file.
        info: Option<DeviceInfo>,
    },
    /// The source has nothing more (end of a replay file).
    End,
    /// The source cannot go on; the message names no key and no timing.
    Failed(String),
}

/// What one raw input event means to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapped {
    /// A keyboard key changed state.
    Key(CapturedKey),
    /// Events were lost in the kernel.
    Dropped,
    /// Anything else: sync reports, LEDs, scan codes (`EV_MSC`), mouse and gamepad buttons.
    Ignored,
}

/// evdev event types and codes the agent cares about (linux/input-event-codes.h).
mod codes {
    pub const EV_SYN: u16 = 0x00;
    pub const EV_KEY: u16 = 0x01;
    pub const SYN_DROPPED: u16 = 3;
    /// `BTN_MISC` to the last gamepad/wheel button: mouse, joystick, gamepad, tablet buttons.
    pub const BUTTONS: std::ops::RangeInclusive<u16> = 0x100..=0x15f;
    /// `BTN_DPAD_UP` ..= `BTN_DPAD_RIGHT`.
    pub const DPAD: std::ops::RangeInclusive<u16> = 0x220..=0x223;
    /// `BTN_TRIGGER_HAPPY1` ..= `BTN_TRIGGER_HAPPY40`.
    pub const TRIGGER_HAPPY: std::ops::RangeInclusive<u16> = 0x2c0..=0x2e7;
}

/// Maps one raw input event (`type`, `code`, `value`, kernel timestamp) to what the agent keeps:
/// keyboard keys with value 1 (down), 0 (up) and 2 (auto-repeat); buttons of mice, joysticks and
/// gamepads, and every other event type, are ignored.
pub fn map_input(event_type: u16, code: u16, value: i32, time: SystemTime) -> Mapped {
    match event_type {
        codes::EV_SYN if code == codes::SYN_DROPPED => Mapped::Dropped,
        codes::EV_KEY => {
            let is_button =
                codes::BUTTONS.contains(&code) || codes::DPAD.contains(&code) || codes::TRIGGER_HAPPY.contains(&code);
            if is_button || u32::from(code) > MAX_KEY_CODE {
                return Mapped::Ignored;
            }
            let action = match value {
                0 => KeyAction::Up,
                1 => KeyAction::Down,
                2 => KeyAction::Repeat,
                _ => return Mapped::Ignored,
            };
            Mapped::Key(CapturedKey { time_us: epoch_us(time), code, action })
        }
        _ => Mapped::Ignored,
    }
}

/// Microseconds since the Unix epoch (0 for times before it).
pub fn epoch_us(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// An evdev device with the keys of a keyboard: letters, space and enter. Mice, power buttons
/// and lid switches are evdev devices too.
pub fn is_keyboard(device: &evdev::Device) -> bool {
    use evdev::KeyCode;
    device.supported_keys().is_some_and(|keys| {
        [KeyCode::KEY_A, KeyCode::KEY_Z, KeyCode::KEY_SPACE, KeyCode::KEY_ENTER].iter().all(|k| keys.contains(*k))
    })
}

/// evdev's `BUS_VIRTUAL` (linux/input.h): a device made in software.
pub const BUS_VIRTUAL: u16 = 0x06;

/// The input device behind the keys, as the batch reports it (`proto::DeviceInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// evdev bus type.
    pub bus_type: u16,
    /// Made in software: `BUS_VIRTUAL`, or placed by the kernel under `/sys/devices/virtual`
    /// (uinput devices are, whatever bus type their creator claims).
    pub is_virtual: bool,
    /// USB-style vendor id.
    pub vendor: u16,
    /// USB-style product id.
    pub product: u16,
    /// The content-free device id ([`device_id`]).
    pub fingerprint: String,
}

/// What the agent reports of a device: its `input_id`, and the sysfs path the kernel gives its
/// event node (`/sys/class/input/eventN/device`, resolved), if it could be read.
pub fn device_info(bus_type: u16, vendor: u16, product: u16, sysfs: Option<&Path>, fingerprint: String) -> DeviceInfo {
    let under_virtual = sysfs.is_some_and(|p| p.starts_with("/sys/devices/virtual"));
    DeviceInfo { bus_type, is_virtual: bus_type == BUS_VIRTUAL || under_virtual, vendor, product, fingerprint }
}

/// The resolved sysfs device of an event node (`/dev/input/event3` ->
/// `/sys/devices/.../input/input7`).
fn sysfs_device(node: &Path) -> Option<PathBuf> {
    let name = node.file_name()?;
    std::fs::canonicalize(Path::new("/sys/class/input").join(name).join("device")).ok()
}

/// [`DeviceInfo`] of an open device read from `node`.
pub fn info_of(device: &evdev::Device, node: Option<&Path>) -> DeviceInfo {
    let id = device.input_id();
    let sysfs = node.and_then(sysfs_device);
    device_info(id.bus_type().0, id.vendor(), id.product(), sysfs.as_deref(), device_id(device))
}

/// A content-free id for a device: its bus, vendor, product and name hashed (device ids are
/// visible to every consumer of the topic; hardware serials are not needed to tell devices apart).
pub fn device_id(device: &evdev::Device) -> String {
    use sha2::{Digest, Sha256};
    let id = device.input_id();
    let mut h = Sha256::new();
    h.update(format!("{:?}:{:04x}:{:04x}:", id.bus_type(), id.vendor(), id.product()));
    h.update(device.name().unwrap_or_default());
    format!("kbd-{}", &hex::encode(h.finalize())[..12])
}

/// Where to read keys: one device path, or the first keyboard found.
#[derive(Debug, Clone)]
pub enum DeviceChoice {
    /// `--device /dev/input/eventN`.
    Path(PathBuf),
    /// The first device that [`is_keyboard`].
    AutoDetect,
}

/// The device and the event node it was opened from.
fn open_device(choice: &DeviceChoice) -> io::Result<(evdev::Device, PathBuf)> {
    match choice {
        DeviceChoice::Path(p) => evdev::Device::open(p).map(|d| (d, p.clone())),
        DeviceChoice::AutoDetect => evdev::enumerate()
            .find(|(_, d)| is_keyboard(d))
            .map(|(path, d)| (d, path))
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no keyboard among /dev/input/event*")),
    }
}

/// Reads a keyboard until `stop`; a device that disappears (or is not there yet) is waited for,
/// checking every `retry`. Runs on its own thread: reads block in the kernel.
pub fn run_evdev(choice: DeviceChoice, retry: Duration, tx: Sender<SourceItem>, stop: CancellationToken) {
    let mut reported_lost = false;
    while !stop.is_cancelled() {
        let (mut device, node) = match open_device(&choice) {
            Ok(opened) => opened,
            Err(e) => {
                if !reported_lost {
                    tracing::warn!(error = %e, "no keyboard to read: waiting for one");
                    if tx.send(SourceItem::DeviceLost).is_err() {
                        return;
                    }
                    reported_lost = true;
                }
                std::thread::sleep(retry); // polling for a device to appear
                continue;
            }
        };
        let info = info_of(&device, Some(&node));
        if info.is_virtual {
            tracing::info!(bus = info.bus_type, "the keyboard is a virtual device");
        }
        let ready = SourceItem::DeviceReady { device_id: info.fingerprint.clone(), info: Some(info) };
        if tx.send(ready).is_err() {
            return;
        }
        loop {
            let events = match device.fetch_events() {
                Ok(events) => events,
                Err(e) => {
                    // ENODEV: unplugged. Anything else: the device is no longer readable either.
                    tracing::warn!(error = %e, "keyboard lost: waiting for it to come back");
                    if tx.send(SourceItem::DeviceLost).is_err() {
                        return;
                    }
                    reported_lost = true;
                    break;
                }
            };
            for e in events {
                let item = match map_input(e.event_type().0, e.code(), e.value(), e.timestamp()) {
                    Mapped::Key(k) => SourceItem::Key(k),
                    Mapped::Dropped => SourceItem::KernelDropped,
                    Mapped::Ignored => continue,
                };
                if tx.send(item).is_err() {
                    return;
                }
            }
            if stop.is_cancelled() {
                return;
            }
        }
    }
}

/// Replays one user of a keylog file as if typed now: `speed` 1 keeps the recorded pace, 2 is
/// twice as fast, 0 sends everything at once. Event times are the file's, shifted so the first
/// event happens when the replay starts (a replay is a new capture, not a copy of old data).
pub fn run_replay(path: &Path, user: Option<&str>, speed: f64, tx: Sender<SourceItem>, stop: CancellationToken) {
    let reader = match KeylogReader::open(path) {
        Ok(r) => r,
        Err(e) => {
            let _ = tx.send(SourceItem::Failed(e.to_string()));
            return;
        }
    };
    if tx.send(SourceItem::DeviceReady { device_id: "replay".to_owned(), info: None }).is_err() {
        return;
    }
    let started = Instant::now();
    let start_us = epoch_us(SystemTime::now());
    let mut replayed_user: Option<String> = user.map(str::to_owned);
    let mut first_us: Option<i64> = None;
    for row in reader {
        if stop.is_cancelled() {
            return;
        }
        let row = match row {
            Ok(r) => r,
            Err(e) => {
                // Row errors name the line and the problem, never the values.
                let _ = tx.send(SourceItem::Failed(e.to_string()));
                return;
            }
        };
        let wanted = replayed_user.get_or_insert_with(|| row.user_id.clone());
        if row.user_id != *wanted {
            continue;
        }
        let offset_us = row.event.time_us - *first_us.get_or_insert(row.event.time_us);
        if speed > 0.0 {
            let due = Duration::from_micros((offset_us.max(0) as f64 / speed) as u64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait); // pacing the replay, not synchronisation
            }
        }
        let key = CapturedKey {
            time_us: start_us + offset_us,
            // The reader has checked the code is at most MAX_KEY_CODE.
            code: row.event.key as u16,
            action: row.event.action,
        };
        if tx.send(SourceItem::Key(key)).is_err() {
            return;
        }
    }
    let _ = tx.send(SourceItem::End);
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: SystemTime = SystemTime::UNIX_EPOCH;

    fn at(us: u64) -> SystemTime {
        T + Duration::from_micros(us)
    }

    #[test]
    fn keys_map_to_down_up_and_repeat_with_their_kernel_time() {
        let a = evdev::KeyCode::KEY_A.0;
        assert_eq!(
            map_input(1, a, 1, at(1_500)),
            Mapped::Key(CapturedKey { time_us: 1_500, code: a, action: KeyAction::Down })
        );
        assert!(matches!(map_input(1, a, 2, at(2_000)), Mapped::Key(CapturedKey { action: KeyAction::Repeat, .. })));
        assert!(matches!(map_input(1, a, 0, at(3_000)), Mapped::Key(CapturedKey { action: KeyAction::Up, .. })));
        assert_eq!(map_input(1, a, 7, at(0)), Mapped::Ignored, "no such key value");
    }

    #[test]
    fn buttons_and_other_event_types_are_not_keys() {
        let ignored = [
            (1, evdev::KeyCode::BTN_LEFT.0),
            (1, evdev::KeyCode::BTN_SOUTH.0),
            (1, evdev::KeyCode::BTN_DPAD_UP.0),
            (1, evdev::KeyCode::BTN_TRIGGER_HAPPY1.0),
            (1, 0x300),
            (0, 0),  // SYN_REPORT
            (4, 4),  // EV_MSC MSC_SCAN: the scan code, also a key identity
            (17, 1), // EV_LED
            (2, 0),  // EV_REL (mouse motion)
        ];
        for (t, c) in ignored {
            assert_eq!(map_input(t, c, 1, at(0)), Mapped::Ignored, "type {t} code {c:#x}");
        }
        // Keys beyond the first 256 codes and the buttons are still keys (KEY_OK, KEY_FN...).
        assert!(matches!(map_input(1, evdev::KeyCode::KEY_OK.0, 1, at(0)), Mapped::Key(_)));
        assert!(matches!(map_input(1, evdev::KeyCode::KEY_FN.0, 1, at(0)), Mapped::Key(_)));
    }

    #[test]
    fn virtual_devices_are_told_by_bus_or_by_where_the_kernel_put_them() {
        let usb = Path::new("/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2:1.0/0003:046D:C31C.0001/input/input7");
        let uinput = Path::new("/sys/devices/virtual/input/input21");
        let k = |bus, sysfs: Option<&Path>| device_info(bus, 0x046d, 0xc31c, sysfs, "kbd-x".into());
        assert!(!k(0x03, Some(usb)).is_virtual, "a USB keyboard");
        assert!(!k(0x11, None).is_virtual, "an i8042 keyboard, sysfs unreadable");
        assert!(k(BUS_VIRTUAL, None).is_virtual, "BUS_VIRTUAL");
        // uinput lets its creator claim any bus (ydotool claims USB); sysfs still says virtual.
        assert!(k(0x03, Some(uinput)).is_virtual, "uinput claiming USB");
        let info = k(0x05, Some(usb));
        assert_eq!((info.bus_type, info.vendor, info.product, info.fingerprint.as_str()), (5, 0x046d, 0xc31c, "kbd-x"));
    }

    #[test]
    fn a_kernel_overflow_is_reported() {
        assert_eq!(map_input(0, 3, 0, at(0)), Mapped::Dropped);
    }

    #[test]
    fn evdev_input_events_go_through_the_same_mapping() {
        let e = evdev::InputEvent::new(evdev::EventType::KEY.0, evdev::KeyCode::KEY_SPACE.0, 1);
        let mapped = map_input(e.event_type().0, e.code(), e.value(), e.timestamp());
        assert_eq!(mapped, Mapped::Key(CapturedKey { time_us: 0, code: 57, action: KeyAction::Down }));
    }

    #[test]
    fn replay_sends_one_users_events_shifted_to_now_then_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.csv");
        std::fs::write(
            &path,
            "user_id,session_id,event_time_us,key_code,action\n\
             a,s,1000000,30,down\nb,s,1000500,31,down\na,s,1080000,30,up\na,s,1100000,2,repeat\n",
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let before = epoch_us(SystemTime::now());
        run_replay(&path, None, 0.0, tx, CancellationToken::new());
        let items: Vec<SourceItem> = rx.iter().collect();
        assert_eq!(items[0], SourceItem::DeviceReady { device_id: "replay".into(), info: None });
        assert_eq!(items.last(), Some(&SourceItem::End));
        let keys: Vec<CapturedKey> =
            items.iter().filter_map(|i| if let SourceItem::Key(k) = i { Some(*k) } else { None }).collect();
        assert_eq!(
            keys.iter().map(|k| (k.code, k.action)).collect::<Vec<_>>(),
            [(30, KeyAction::Down), (30, KeyAction::Up), (2, KeyAction::Repeat)]
        );
        assert!(keys[0].time_us >= before);
        assert_eq!(keys[1].time_us - keys[0].time_us, 80_000);
        assert_eq!(keys[2].time_us - keys[0].time_us, 100_000);
    }

    #[test]
    fn a_bad_replay_row_fails_without_its_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.csv");
        std::fs::write(&path, "user_id,session_id,event_time_us,key_code,action\na,s,1000,98765,down\n").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        run_replay(&path, Some("a"), 0.0, tx, CancellationToken::new());
        let last = rx.iter().last().unwrap();
        let SourceItem::Failed(message) = last else { panic!("{last:?}") };
        assert!(message.contains("line 2") && !message.contains("98765"), "{message}");
    }
}
