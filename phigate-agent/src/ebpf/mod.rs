//! The kernel side, from userspace: load the embedded programs, attach them to the
//! attach cgroup, pin maps and links so protection outlives the agent, adopt that
//! pinned state on restart, and read and write the maps.
//!
//! This is the only module that imports `aya`. Everything above it sees plain types:
//! [`KernelState`] for map access, [`install`] / [`detach`] for lifecycle, and
//! [`EventReader`] for kernel reports.
//!
//! Pin layout under `agent.pin_dir`:
//! ```text
//! <pin_dir>/maps/PG_*            every map (the sk-storage map included)
//! <pin_dir>/links/<program>      one cgroup link per program
//! ```

mod sys;

use std::{
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd, RawFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, RingBuf, SockMap},
    programs::{links::FdLink, CgroupAttachMode, CgroupSkbAttachType},
    Ebpf, EbpfLoader,
};
use ipnet::IpNet;
use phigate_common::{counter, maps, programs, target, Db4Key, Db6Key, ABI_VERSION};
pub use phigate_common::{ConnectRecord, DbTarget, Event, OrigDstKey, ProtectedCgroup, Settings};

pub use sys::LinkInfo;

/// The kernel object built by `cargo xtask build-ebpf` (see build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("PHIGATE_EBPF_OBJECT"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("loading the kernel programs failed: {0}. phigate needs Linux >= 5.15 with BTF and must run as root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)")]
    Load(aya::EbpfError),
    #[error("the kernel rejected program {program}: {err}. Run `phigate detach` and start again; if it persists, report the kernel version (`uname -r`)")]
    Program { program: &'static str, err: aya::programs::ProgramError },
    #[error("cannot attach {program} to cgroup {cgroup}: {err}")]
    Attach { program: &'static str, cgroup: PathBuf, err: io::Error },
    #[error("cannot pin {path}: {err}")]
    Pin { path: PathBuf, err: io::Error },
    #[error("no phigate state is pinned at {0}: start the agent (`phigate run`) first, or point --config at the configuration the agent runs with")]
    NotInstalled(PathBuf),
    #[error("the pinned maps at {dir} were written by a phigate with map layout {found}, this one uses {ABI_VERSION}: run `phigate detach` (protection stops until the agent restarts) and start the agent again")]
    AbiMismatch { dir: PathBuf, found: u32 },
    #[error("map {name} at {path}: {err}")]
    Map { name: &'static str, path: PathBuf, err: aya::maps::MapError },
    #[error("cannot open cgroup {path}: {err}")]
    Cgroup { path: PathBuf, err: io::Error },
}

/// Where pinned objects live.
#[derive(Debug, Clone)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    pub fn new(root: &Path) -> Self {
        Self { root: root.to_path_buf() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }
    fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }
    fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }
    fn link(&self, program: &str) -> PathBuf {
        self.links_dir().join(program)
    }
    pub fn is_installed(&self) -> bool {
        self.map(maps::SETTINGS).exists()
    }
}

/// How a program came to be attached by [`install`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachOutcome {
    /// Newly attached and pinned.
    Attached,
    /// A pinned link from an earlier agent was adopted; its program was replaced in
    /// place by this agent's (no moment without protection).
    Adopted,
    /// A pinned link pointed at another cgroup (the attach point changed); it was
    /// removed and the program attached at the configured cgroup.
    Moved,
}

/// The cgroup programs are attached to, as `install` needs it.
pub struct AttachPoint<'a> {
    pub dir: &'a Path,
    pub id: u64,
}

/// Attach order matters: the record hand-off (sock_ops), getpeername and the guards
/// must be in place before connect4/6 start redirecting, so that no connection is
/// redirected without its record.
const ATTACH_ORDER: [&str; 7] =
    [programs::SOCK_OPS, programs::GETPEERNAME4, programs::GETPEERNAME6, programs::EGRESS, programs::SOCK_CREATE, programs::CONNECT4, programs::CONNECT6];

fn expected_attach_type(program: &str) -> u32 {
    use sys::attach_type as a;
    match program {
        programs::CONNECT4 => a::INET4_CONNECT,
        programs::CONNECT6 => a::INET6_CONNECT,
        programs::GETPEERNAME4 => a::INET4_GETPEERNAME,
        programs::GETPEERNAME6 => a::INET6_GETPEERNAME,
        programs::SOCK_OPS => a::SOCK_OPS,
        programs::EGRESS => a::INET_EGRESS,
        _ => a::INET_SOCK_CREATE,
    }
}

/// Load the programs, pin every map, and make sure each program is attached to
/// `attach` through a pinned link — adopting links an earlier agent pinned rather
/// than attaching a second copy.
pub fn install(layout: &PinLayout, attach: AttachPoint<'_>) -> Result<Vec<(&'static str, AttachOutcome)>, EbpfError> {
    for dir in [layout.maps_dir(), layout.links_dir()] {
        fs::create_dir_all(&dir).map_err(|err| EbpfError::Pin { path: dir.clone(), err })?;
    }
    if layout.is_installed() {
        // 0: maps pinned by an agent that stopped before writing its settings.
        let found = read_abi(layout)?;
        if found != ABI_VERSION && found != 0 {
            return Err(EbpfError::AbiMismatch { dir: layout.root.clone(), found });
        }
    }
    let mut loader = EbpfLoader::new();
    let paths: Vec<(&str, PathBuf)> = maps::ALL.iter().map(|n| (*n, layout.map(n))).collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut bpf = loader.load(OBJECT).map_err(EbpfError::Load)?;

    let cgroup = fs::File::open(attach.dir).map_err(|err| EbpfError::Cgroup { path: attach.dir.to_path_buf(), err })?;
    let mut outcomes = Vec::new();
    for program in ATTACH_ORDER {
        let outcome = attach_one(&mut bpf, layout, program, &cgroup, attach.id, attach.dir)?;
        outcomes.push((program, outcome));
    }
    Ok(outcomes)
}

fn read_abi(layout: &PinLayout) -> Result<u32, EbpfError> {
    let path = layout.map(maps::SETTINGS);
    let data = MapData::from_pin(&path).map_err(|err| EbpfError::Map { name: maps::SETTINGS, path: path.clone(), err })?;
    let arr: Array<MapData, Settings> = Array::try_from(Map::Array(data)).map_err(|err| EbpfError::Map { name: maps::SETTINGS, path: path.clone(), err })?;
    Ok(arr.get(&0, 0).map(|s| s.abi_version).unwrap_or(0))
}

fn attach_one(
    bpf: &mut Ebpf,
    layout: &PinLayout,
    program: &'static str,
    cgroup: &fs::File,
    cgroup_id: u64,
    cgroup_dir: &Path,
) -> Result<AttachOutcome, EbpfError> {
    let prog_err = |err| EbpfError::Program { program, err };
    let prog = bpf.program_mut(program).ok_or(EbpfError::Program { program, err: aya::programs::ProgramError::UnexpectedProgramType })?;
    // Load (verify) first: an adopted link is then switched to this exact program.
    match prog {
        aya::programs::Program::CgroupSockAddr(p) => p.load().map_err(prog_err)?,
        aya::programs::Program::SockOps(p) => p.load().map_err(prog_err)?,
        aya::programs::Program::CgroupSkb(p) => p.load().map_err(prog_err)?,
        aya::programs::Program::CgroupSock(p) => p.load().map_err(prog_err)?,
        _ => return Err(prog_err(aya::programs::ProgramError::UnexpectedProgramType)),
    }
    let prog_fd: RawFd = prog.fd().map_err(prog_err)?.as_fd().as_raw_fd();
    let pin = layout.link(program);
    let mut moved = false;
    if pin.exists() {
        let link = sys::obj_get(&pin).map_err(|err| EbpfError::Pin { path: pin.clone(), err })?;
        let info = sys::link_info(link.as_fd()).map_err(|err| EbpfError::Pin { path: pin.clone(), err })?;
        if info.link_type == sys::LINK_TYPE_CGROUP && info.cgroup_id == cgroup_id && info.attach_type == expected_attach_type(program) {
            // SAFETY: prog_fd belongs to `bpf`, which outlives this call.
            let prog_fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(prog_fd) };
            sys::link_update(link.as_fd(), prog_fd).map_err(|err| EbpfError::Attach { program, cgroup: cgroup_dir.to_path_buf(), err })?;
            return Ok(AttachOutcome::Adopted);
        }
        // The configured attach point changed since the link was pinned.
        fs::remove_file(&pin).map_err(|err| EbpfError::Pin { path: pin.clone(), err })?;
        drop(link);
        moved = true;
    }
    let attach_err = |e: &dyn std::fmt::Display| EbpfError::Attach { program, cgroup: cgroup_dir.to_path_buf(), err: io::Error::other(e.to_string()) };
    // CgroupAttachMode::Single: with bpf_link (kernel >= 5.7) the kernel already allows
    // several links per hook; AllowMultiple fails with EINVAL there (aya issue 1078).
    let link: FdLink = match prog {
        aya::programs::Program::CgroupSockAddr(p) => {
            let id = p.attach(cgroup, CgroupAttachMode::Single).map_err(|e| attach_err(&e))?;
            p.take_link(id).map_err(|e| attach_err(&e))?.try_into().map_err(|e: aya::programs::links::LinkError| attach_err(&e))?
        }
        aya::programs::Program::SockOps(p) => {
            let id = p.attach(cgroup, CgroupAttachMode::Single).map_err(|e| attach_err(&e))?;
            p.take_link(id).map_err(|e| attach_err(&e))?.try_into().map_err(|e: aya::programs::links::LinkError| attach_err(&e))?
        }
        aya::programs::Program::CgroupSkb(p) => {
            let id = p.attach(cgroup, CgroupSkbAttachType::Egress, CgroupAttachMode::Single).map_err(|e| attach_err(&e))?;
            p.take_link(id).map_err(|e| attach_err(&e))?.try_into().map_err(|e: aya::programs::links::LinkError| attach_err(&e))?
        }
        aya::programs::Program::CgroupSock(p) => {
            let id = p.attach(cgroup, CgroupAttachMode::Single).map_err(|e| attach_err(&e))?;
            p.take_link(id).map_err(|e| attach_err(&e))?.try_into().map_err(|e: aya::programs::links::LinkError| attach_err(&e))?
        }
        _ => return Err(prog_err(aya::programs::ProgramError::UnexpectedProgramType)),
    };
    // Pinning is what keeps protection alive when the agent dies: without it the link
    // would be released with the agent's file descriptors (fail-open).
    link.pin(&pin).map_err(|e| EbpfError::Pin { path: pin.clone(), err: io::Error::other(e.to_string()) })?;
    Ok(if moved { AttachOutcome::Moved } else { AttachOutcome::Attached })
}

/// A pinned link as `phigate status` shows it.
#[derive(Debug, Clone)]
pub struct LinkStatus {
    pub program: &'static str,
    pub info: Option<LinkInfo>,
    pub error: Option<String>,
}

pub fn links(layout: &PinLayout) -> Vec<LinkStatus> {
    programs::ALL
        .iter()
        .map(|program| {
            let pin = layout.link(program);
            if !pin.exists() {
                return LinkStatus { program, info: None, error: None };
            }
            match sys::obj_get(&pin).and_then(|fd| sys::link_info(fd.as_fd())) {
                Ok(info) => LinkStatus { program, info: Some(info), error: None },
                Err(e) => LinkStatus { program, info: None, error: Some(e.to_string()) },
            }
        })
        .collect()
}

/// What [`detach`] removed.
#[derive(Debug, Default)]
pub struct DetachReport {
    pub links: Vec<&'static str>,
    pub maps: Vec<&'static str>,
}

/// Remove every pinned link (the kernel detaches a link once its last reference goes)
/// and every pinned map, then the directories.
pub fn detach(layout: &PinLayout) -> Result<DetachReport, EbpfError> {
    let mut report = DetachReport::default();
    for program in programs::ALL {
        let pin = layout.link(program);
        match fs::remove_file(&pin) {
            Ok(()) => report.links.push(program),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(EbpfError::Pin { path: pin, err }),
        }
    }
    for name in maps::ALL {
        let pin = layout.map(name);
        match fs::remove_file(&pin) {
            Ok(()) => report.maps.push(name),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(EbpfError::Pin { path: pin, err }),
        }
    }
    for dir in [layout.links_dir(), layout.maps_dir(), layout.root.clone()] {
        match fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(EbpfError::Pin { path: dir, err }),
        }
    }
    Ok(report)
}

/// A protected database prefix as the kernel map holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbEntry {
    pub prefix: IpNet,
    pub port: u16,
    pub db_index: u32,
    pub name: String,
    pub listen4: Option<(Ipv4Addr, u16)>,
    pub listen6: Option<(Ipv6Addr, u16)>,
}

/// Summed per-CPU counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub redirected: u64,
    pub refused: u64,
    pub bypass_dropped: u64,
    pub raw_sockets_denied: u64,
    pub records_published: u64,
    pub records_lost: u64,
}

/// The pinned maps, opened. Shared by the agent (behind `&self`; each map has its own
/// lock) and by the CLI commands that change a running node.
pub struct KernelState {
    layout: PinLayout,
    cgroups: Mutex<HashMap<MapData, u64, ProtectedCgroup>>,
    db4: Mutex<LpmTrie<MapData, Db4Key, DbTarget>>,
    db6: Mutex<LpmTrie<MapData, Db6Key, DbTarget>>,
    orig: Mutex<HashMap<MapData, OrigDstKey, ConnectRecord>>,
    settings: Mutex<Array<MapData, Settings>>,
    counters: PerCpuArray<MapData, u64>,
    listeners: Mutex<SockMap<MapData>>,
}

fn open_map<T>(layout: &PinLayout, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let path = layout.map(name);
    if !path.exists() {
        return Err(EbpfError::NotInstalled(layout.root.clone()));
    }
    let data = MapData::from_pin(&path).map_err(|err| EbpfError::Map { name, path: path.clone(), err })?;
    let map = Map::from_map_data(data).map_err(|err| EbpfError::Map { name, path: path.clone(), err })?;
    T::try_from(map).map_err(|err| EbpfError::Map { name, path, err })
}

impl KernelState {
    pub fn open(layout: &PinLayout) -> Result<Self, EbpfError> {
        if !layout.is_installed() {
            return Err(EbpfError::NotInstalled(layout.root.clone()));
        }
        let found = read_abi(layout)?;
        if found != ABI_VERSION && found != 0 {
            return Err(EbpfError::AbiMismatch { dir: layout.root.clone(), found });
        }
        Ok(Self {
            layout: layout.clone(),
            cgroups: Mutex::new(open_map(layout, maps::PROTECTED_CGROUPS)?),
            db4: Mutex::new(open_map(layout, maps::DB4)?),
            db6: Mutex::new(open_map(layout, maps::DB6)?),
            orig: Mutex::new(open_map(layout, maps::ORIG_DST)?),
            settings: Mutex::new(open_map(layout, maps::SETTINGS)?),
            counters: open_map(layout, maps::COUNTERS)?,
            listeners: Mutex::new(open_map(layout, maps::LISTENERS)?),
        })
    }

    /// Put this agent's listening sockets where connect4/6 look for a live agent
    /// (`slot` from [`phigate_common::listener_slot`]). The kernel removes each when
    /// it closes, so nothing needs undoing when the agent stops or dies.
    pub fn publish_listeners(&self, sockets: &[(u32, std::os::fd::RawFd)]) -> Result<(), EbpfError> {
        let mut m = self.listeners.lock().expect("invariant: lock not poisoned");
        for (slot, fd) in sockets {
            m.set(*slot, fd, 0).map_err(self.map_err(maps::LISTENERS))?;
        }
        Ok(())
    }

    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }

    fn map_err(&self, name: &'static str) -> impl Fn(aya::maps::MapError) -> EbpfError + '_ {
        move |err| EbpfError::Map { name, path: self.layout.map(name), err }
    }

    // -- settings

    pub fn settings(&self) -> Result<Settings, EbpfError> {
        let s = self.settings.lock().expect("invariant: map lock not poisoned");
        s.get(&0, 0).map_err(self.map_err(maps::SETTINGS))
    }

    pub fn set_settings(&self, value: Settings) -> Result<(), EbpfError> {
        let mut s = self.settings.lock().expect("invariant: map lock not poisoned");
        s.set(0, value, 0).map_err(self.map_err(maps::SETTINGS))
    }

    // -- protected cgroups

    pub fn protected_cgroups(&self) -> Result<Vec<(u64, ProtectedCgroup)>, EbpfError> {
        let m = self.cgroups.lock().expect("invariant: map lock not poisoned");
        m.iter().collect::<Result<Vec<_>, _>>().map_err(self.map_err(maps::PROTECTED_CGROUPS))
    }

    pub fn protected_cgroup(&self, id: u64) -> Option<ProtectedCgroup> {
        let m = self.cgroups.lock().expect("invariant: map lock not poisoned");
        m.get(&id, 0).ok()
    }

    pub fn protect(&self, id: u64, entry: ProtectedCgroup) -> Result<(), EbpfError> {
        let mut m = self.cgroups.lock().expect("invariant: map lock not poisoned");
        m.insert(id, entry, 0).map_err(self.map_err(maps::PROTECTED_CGROUPS))
    }

    /// Returns whether the cgroup was protected.
    pub fn unprotect(&self, id: u64) -> Result<bool, EbpfError> {
        let mut m = self.cgroups.lock().expect("invariant: map lock not poisoned");
        match m.remove(&id) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(self.map_err(maps::PROTECTED_CGROUPS)(e)),
        }
    }

    // -- databases

    pub fn databases(&self) -> Result<Vec<DbEntry>, EbpfError> {
        let mut out = Vec::new();
        let m4 = self.db4.lock().expect("invariant: map lock not poisoned");
        for item in m4.iter() {
            let (k, v) = item.map_err(self.map_err(maps::DB4))?;
            let data = k.data();
            let prefix = IpNet::new(IpAddr::V4(Ipv4Addr::from(data.addr)), (k.prefix_len() - 16) as u8).expect("invariant: kernel prefix <= 32");
            out.push(entry_from(prefix, u16::from_be_bytes(data.port), &v));
        }
        drop(m4);
        let m6 = self.db6.lock().expect("invariant: map lock not poisoned");
        for item in m6.iter() {
            let (k, v) = item.map_err(self.map_err(maps::DB6))?;
            let data = k.data();
            let prefix = IpNet::new(IpAddr::V6(Ipv6Addr::from(data.addr)), (k.prefix_len() - 16) as u8).expect("invariant: kernel prefix <= 128");
            out.push(entry_from(prefix, u16::from_be_bytes(data.port), &v));
        }
        out.sort_by_cached_key(|e| (e.db_index, e.prefix.to_string()));
        Ok(out)
    }

    /// Make the database maps equal `wanted`: insert/update, then remove what is
    /// no longer configured. Inserting first means a prefix that stays protected is
    /// never absent, even for a moment.
    pub fn sync_databases(&self, wanted: &[DbEntry]) -> Result<(), EbpfError> {
        let mut want4 = Vec::new();
        let mut want6 = Vec::new();
        for e in wanted {
            let port = e.port.to_be_bytes();
            let len = 16 + u32::from(e.prefix.prefix_len());
            match e.prefix {
                IpNet::V4(n) => want4.push((Key::new(len, Db4Key { port, addr: n.network().octets() }), target_from(e))),
                IpNet::V6(n) => want6.push((Key::new(len, Db6Key { port, addr: n.network().octets() }), target_from(e))),
            }
        }
        let mut m4 = self.db4.lock().expect("invariant: map lock not poisoned");
        sync_trie(&mut m4, &want4).map_err(self.map_err(maps::DB4))?;
        let mut m6 = self.db6.lock().expect("invariant: map lock not poisoned");
        sync_trie(&mut m6, &want6).map_err(self.map_err(maps::DB6))
    }

    // -- connection records

    /// Take (read and delete) the record the kernel published for a client.
    /// Delete the records of connects made before `mono_ns` (CLOCK_MONOTONIC, the
    /// clock of `bpf_ktime_get_ns`). At start, records from before this agent's
    /// listeners were in the maps belong to connects that reached no listener (the
    /// kernel refused them while no agent ran): left in place, a record would name
    /// its workload to whoever connects to the listener from the same address and
    /// port later. Returns how many went.
    pub fn forget_records_before(&self, mono_ns: u64) -> Result<usize, EbpfError> {
        let mut m = self.orig.lock().expect("invariant: map lock not poisoned");
        let stale: Vec<OrigDstKey> = m.iter().filter_map(Result::ok).filter(|(_, rec)| rec.connect_ns < mono_ns).map(|(k, _)| k).collect();
        for k in &stale {
            m.remove(k).map_err(self.map_err(maps::ORIG_DST))?;
        }
        Ok(stale.len())
    }

    pub fn take_record(&self, key: &OrigDstKey) -> Option<ConnectRecord> {
        let mut m = self.orig.lock().expect("invariant: map lock not poisoned");
        let rec = m.get(key, 0).ok()?;
        // Deleting keeps the LRU for connections nobody accepted; a failed delete
        // only means the entry ages out.
        let _ = m.remove(key);
        Some(rec)
    }

    // -- counters

    pub fn counters(&self) -> Result<Counters, EbpfError> {
        let sum = |i: u32| -> Result<u64, EbpfError> {
            let v = self.counters.get(&i, 0).map_err(self.map_err(maps::COUNTERS))?;
            Ok(v.iter().copied().fold(0u64, u64::wrapping_add))
        };
        Ok(Counters {
            redirected: sum(counter::REDIRECTED)?,
            refused: sum(counter::REFUSED)?,
            bypass_dropped: sum(counter::BYPASS_DROPPED)?,
            raw_sockets_denied: sum(counter::RAW_SOCKET_DENIED)?,
            records_published: sum(counter::RECORD_PUBLISHED)?,
            records_lost: sum(counter::RECORD_LOST)?,
        })
    }
}

/// Insert every wanted key, then remove keys not wanted.
fn sync_trie<K: aya::Pod + PartialEq>(trie: &mut LpmTrie<MapData, K, DbTarget>, wanted: &[(Key<K>, DbTarget)]) -> Result<(), aya::maps::MapError> {
    for (key, value) in wanted {
        trie.insert(key, *value, 0)?;
    }
    let same = |a: &Key<K>, b: &Key<K>| a.prefix_len() == b.prefix_len() && a.data() == b.data();
    let stale: Vec<Key<K>> = trie.keys().filter_map(Result::ok).filter(|k| !wanted.iter().any(|(w, _)| same(w, k))).collect();
    for key in stale {
        trie.remove(&key)?;
    }
    Ok(())
}

fn entry_from(prefix: IpNet, port: u16, v: &DbTarget) -> DbEntry {
    DbEntry {
        prefix,
        port,
        db_index: v.db_index,
        name: c_str(&v.name),
        listen4: (v.flags & target::HAS_V4 != 0).then(|| (Ipv4Addr::from(v.listen4_addr), v.listen4_port)),
        listen6: (v.flags & target::HAS_V6 != 0).then(|| (Ipv6Addr::from(v.listen6_addr), v.listen6_port)),
    }
}

fn target_from(e: &DbEntry) -> DbTarget {
    let mut flags = 0;
    let (l4a, l4p) = e
        .listen4
        .map(|(a, p)| {
            flags |= target::HAS_V4;
            (a.octets(), p)
        })
        .unwrap_or(([0; 4], 0));
    let (l6a, l6p) = e
        .listen6
        .map(|(a, p)| {
            flags |= target::HAS_V6;
            (a.octets(), p)
        })
        .unwrap_or(([0; 16], 0));
    DbTarget { db_index: e.db_index, flags, listen4_addr: l4a, listen6_addr: l6a, listen4_port: l4p, listen6_port: l6p, name: fixed(&e.name) }
}

/// Copy a string into a NUL-padded fixed buffer (callers validated the length).
pub fn fixed<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let n = s.len().min(N - 1);
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
    out
}

/// Read a NUL-padded fixed buffer.
pub fn c_str(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Reads kernel reports from the pinned ring buffer.
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl EventReader {
    pub fn open(layout: &PinLayout) -> Result<Self, EbpfError> {
        Ok(Self { ring: open_map(layout, maps::EVENTS)? })
    }

    /// Drain everything available now.
    pub fn drain(&mut self, mut each: impl FnMut(Event)) {
        while let Some(item) = self.ring.next() {
            if item.len() >= std::mem::size_of::<Event>() {
                // SAFETY: the kernel wrote a full `Event`; read_unaligned copes with
                // the ring buffer's 8-byte alignment guarantees either way.
                let ev = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) };
                each(ev);
            }
        }
    }
}

impl std::os::fd::AsRawFd for EventReader {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}
