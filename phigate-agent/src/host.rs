//! Facts about the node the agent runs on: where the cgroup v2 hierarchy is mounted,
//! that a bpffs is mounted for pinning, and how cgroup paths map to cgroup ids.
//!
//! Owns only filesystem-level discovery and the mounts the agent may need to create.
//! It must not load programs or touch maps (that is `ebpf`), and it never hard-codes
//! `/sys/fs/cgroup`: hybrid hierarchies mount cgroup2 elsewhere.

use std::{
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Component, Path, PathBuf},
};

use phigate_common::MAX_CGROUP_DEPTH;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(
        "no cgroup v2 hierarchy is mounted and mounting one at {path} failed: {err}; mount it yourself (`mount -t cgroup2 none {path}`) or run phigate as root"
    )]
    NoCgroup2 { path: PathBuf, err: io::Error },
    #[error("cannot read /proc/self/mountinfo: {0}")]
    Mountinfo(io::Error),
    #[error("{path} is not on a bpffs and mounting one failed: {err}; mount it (`mount -t bpf bpf /sys/fs/bpf`) or choose agent.pin_dir under a bpffs")]
    NoBpffs { path: PathBuf, err: io::Error },
    #[error("cgroup path {0:?} must be relative to the cgroup v2 mount and must not contain `..`")]
    BadCgroupPath(String),
    #[error("cgroup {path} does not exist")]
    CgroupMissing { path: PathBuf },
    #[error("cannot create cgroup {path}: {err}")]
    CgroupCreate { path: PathBuf, err: io::Error },
    #[error("cannot read cgroup {path}: {err}")]
    CgroupRead { path: PathBuf, err: io::Error },
    #[error("cgroup {path} is {depth} levels deep; phigate protects cgroups up to {max} levels below the root")]
    TooDeep { path: PathBuf, depth: u32, max: u32 },
    #[error("cannot read this process's cgroup: {0}")]
    OwnCgroup(io::Error),
}

/// The cgroup v2 hierarchy as mounted on this node.
#[derive(Debug, Clone)]
pub struct CgroupFs {
    mount: PathBuf,
}

/// A cgroup directory, addressed relative to the cgroup2 root, with its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    /// Path relative to the cgroup2 root, `/`-separated, without a leading slash
    /// (empty for the root).
    pub rel: String,
    /// Absolute directory path.
    pub dir: PathBuf,
    /// Cgroup id: the directory's inode number, which is what
    /// `bpf_get_current_cgroup_id()` returns.
    pub id: u64,
    /// Depth below the root (root = 0).
    pub level: u32,
}

impl CgroupFs {
    /// Find the cgroup2 mount from /proc/self/mountinfo. With `override_root` the
    /// caller names it. If none is mounted, mount one at /run/phigate/cgroup2 (there is
    /// only one v2 hierarchy, so any mount point shows the same tree).
    pub fn discover(override_root: Option<&Path>) -> Result<Self, HostError> {
        if let Some(root) = override_root {
            return Ok(Self { mount: root.to_path_buf() });
        }
        let info = fs::read_to_string("/proc/self/mountinfo").map_err(HostError::Mountinfo)?;
        if let Some(mount) = find_mount(&info, "cgroup2") {
            return Ok(Self { mount });
        }
        let path = PathBuf::from("/run/phigate/cgroup2");
        fs::create_dir_all(&path).map_err(|err| HostError::NoCgroup2 { path: path.clone(), err })?;
        nix::mount::mount(Some("none"), &path, Some("cgroup2"), nix::mount::MsFlags::empty(), None::<&str>)
            .map_err(|e| HostError::NoCgroup2 { path: path.clone(), err: e.into() })?;
        Ok(Self { mount: path })
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// Resolve a configured cgroup path (relative to the cgroup2 mount; a leading `/`
    /// is accepted and means the same).
    pub fn resolve(&self, rel: &str) -> Result<Cgroup, HostError> {
        let rel = normalize(rel)?;
        let dir = if rel.is_empty() { self.mount.clone() } else { self.mount.join(&rel) };
        let meta = match fs::metadata(&dir) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(HostError::CgroupMissing { path: dir });
            }
            Err(err) => return Err(HostError::CgroupRead { path: dir, err }),
        };
        if !meta.is_dir() {
            return Err(HostError::CgroupMissing { path: dir });
        }
        let level = if rel.is_empty() { 0 } else { rel.split('/').count() as u32 };
        Ok(Cgroup { rel, dir, id: meta.ino(), level })
    }

    /// Resolve, creating the directory (and parents) if absent.
    pub fn ensure(&self, rel: &str) -> Result<Cgroup, HostError> {
        let norm = normalize(rel)?;
        let dir = self.mount.join(&norm);
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(|err| HostError::CgroupCreate { path: dir.clone(), err })?;
        }
        self.resolve(&norm)
    }

    /// Like [`resolve`](Self::resolve), and refuse cgroups deeper than the kernel
    /// programs look.
    pub fn resolve_protectable(&self, rel: &str) -> Result<Cgroup, HostError> {
        let cg = self.resolve(rel)?;
        check_depth(&cg)?;
        Ok(cg)
    }

    /// The cgroup this process runs in.
    pub fn own(&self) -> Result<Cgroup, HostError> {
        let text = fs::read_to_string("/proc/self/cgroup").map_err(HostError::OwnCgroup)?;
        let rel = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| HostError::OwnCgroup(io::Error::other("no cgroup v2 entry in /proc/self/cgroup")))?;
        self.resolve(rel)
    }
}

pub fn check_depth(cg: &Cgroup) -> Result<(), HostError> {
    if cg.level > MAX_CGROUP_DEPTH {
        return Err(HostError::TooDeep { path: cg.dir.clone(), depth: cg.level, max: MAX_CGROUP_DEPTH });
    }
    Ok(())
}

/// `a/b` is inside `a` (or equal to it).
pub fn is_within(inner: &Cgroup, outer: &Cgroup) -> bool {
    outer.rel.is_empty() || inner.rel == outer.rel || inner.rel.starts_with(&format!("{}/", outer.rel))
}

fn normalize(rel: &str) -> Result<String, HostError> {
    let mut parts = Vec::new();
    for c in Path::new(rel).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(HostError::BadCgroupPath(rel.to_string()));
            }
        }
    }
    Ok(parts.join("/"))
}

/// Mount point of the first filesystem of type `fstype` in mountinfo text.
fn find_mount(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <type> <source> <super opts>"
        let (left, right) = line.split_once(" - ")?;
        let ty = right.split_whitespace().next()?;
        if ty != fstype {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("0"), 8).unwrap_or(b'?');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Make sure `pin_dir` lives on a bpffs. If its nearest existing ancestor is not a
/// bpffs and is exactly /sys/fs/bpf, mount one there (the kernel's conventional place).
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), HostError> {
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(HostError::Mountinfo)?;
    let bpf_mounts: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "bpf" {
                return None;
            }
            Some(PathBuf::from(unescape_mountinfo(left.split_whitespace().nth(4)?)))
        })
        .collect();
    if bpf_mounts.iter().any(|m| pin_dir.starts_with(m)) {
        return Ok(());
    }
    let target = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(target) {
        return Err(HostError::NoBpffs { path: pin_dir.to_path_buf(), err: io::Error::other("no bpffs is mounted above it") });
    }
    fs::create_dir_all(target).map_err(|err| HostError::NoBpffs { path: pin_dir.to_path_buf(), err })?;
    nix::mount::mount(Some("bpf"), target, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| HostError::NoBpffs { path: pin_dir.to_path_buf(), err: e.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_mountinfo() {
        let info = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(find_mount(info, "cgroup2"), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(find_mount(info, "bpf"), None);
    }

    #[test]
    fn unescapes_spaces_in_mount_points() {
        let info = "41 31 0:38 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n";
        assert_eq!(find_mount(info, "cgroup2"), Some(PathBuf::from("/mnt/with space")));
    }

    #[test]
    fn normalizes_and_rejects_parent_components() {
        assert_eq!(normalize("/a/b/").unwrap(), "a/b");
        assert_eq!(normalize("a/./b").unwrap(), "a/b");
        assert_eq!(normalize("/").unwrap(), "");
        assert!(normalize("a/../../etc").is_err());
    }

    #[test]
    fn containment_is_by_path_component() {
        let cg = |rel: &str| Cgroup { rel: rel.into(), dir: PathBuf::new(), id: 0, level: 0 };
        assert!(is_within(&cg("a/b"), &cg("a")));
        assert!(is_within(&cg("a"), &cg("a")));
        assert!(is_within(&cg("x"), &cg("")));
        assert!(!is_within(&cg("ab"), &cg("a")));
    }
}
