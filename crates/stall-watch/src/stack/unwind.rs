//! From a copied stack to return addresses: the loaded modules, their DWARF
//! call-frame information, and framehop.
//!
//! Each module (the executable, each shared library, the vDSO) is listed with
//! `dl_iterate_phdr`: where it is loaded and its executable ranges. Its
//! `.eh_frame` and `.eh_frame_hdr` sections are read from its file with the
//! `object` crate (from memory for the vDSO, which has no file) and handed to
//! framehop, which unwinds using DWARF CFI and falls back to frame pointers
//! where a module has none. framehop reads the stack only through a callback,
//! answered here from the copy, so a bad rule can at worst end the stack early.

use std::ffi::CStr;
use std::ops::Range;
use std::path::PathBuf;

use framehop::{
    CacheNative, ExplicitModuleSectionInfo, MustNotAllocateDuringUnwind, Unwinder, UnwinderNative,
};
use object::{Object, ObjectSection};

use super::RawStack;

/// Frames past this are dropped: a runaway unwind stops here.
const MAX_FRAMES: usize = 256;

/// A module loaded in this process.
pub(super) struct LoadedModule {
    /// Its file; `None` for the vDSO.
    pub(super) path: Option<PathBuf>,
    /// Its file name, for frames without a symbol: `libc.so.6`, `[vdso]`.
    pub(super) name: String,
    /// Load bias: address in the process = address in the file + bias.
    pub(super) bias: u64,
    /// Executable ranges, in process addresses.
    pub(super) text: Vec<Range<u64>>,
    /// The whole image in memory, for the vDSO (which has no file).
    pub(super) image: Option<&'static [u8]>,
    /// A system library (libc, libm…), never the application's own code.
    pub(super) system: bool,
}

impl LoadedModule {
    pub(super) fn contains(&self, address: u64) -> bool {
        self.text.iter().any(|range| range.contains(&address))
    }
}

/// Every module of the process, as the dynamic loader sees it now.
pub(super) fn loaded_modules() -> Vec<LoadedModule> {
    unsafe extern "C" fn each(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: `data` is the `&mut Vec` passed below; `info` and its
        // program headers are valid for this callback, per dl_iterate_phdr.
        unsafe {
            let modules = &mut *data.cast::<Vec<LoadedModule>>();
            let info = &*info;
            let bias = info.dlpi_addr;
            let headers = std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum));
            let mut text = Vec::new();
            let mut image_start = u64::MAX;
            let mut image_end = 0u64;
            for header in headers {
                if header.p_type != libc::PT_LOAD {
                    continue;
                }
                let start = bias + header.p_vaddr;
                let end = start + header.p_memsz;
                image_start = image_start.min(start);
                image_end = image_end.max(end);
                if header.p_flags & libc::PF_X != 0 {
                    text.push(start..end);
                }
            }
            let name = if info.dlpi_name.is_null() {
                ""
            } else {
                CStr::from_ptr(info.dlpi_name).to_str().unwrap_or("")
            };
            let (path, image) = if name.is_empty() {
                // The executable: the loader leaves its name empty.
                (Some(PathBuf::from("/proc/self/exe")), None)
            } else if name.contains("linux-vdso") || name.contains("linux-gate") {
                // The vDSO is mapped whole, section headers included, and
                // never unmapped: read it in place.
                let image = (image_start != 0 && image_end > image_start).then(|| {
                    std::slice::from_raw_parts(
                        image_start as *const u8,
                        (image_end - image_start) as usize,
                    )
                });
                (None, image)
            } else {
                (Some(PathBuf::from(name)), None)
            };
            if text.is_empty() {
                return 0;
            }
            let system = ["/lib/", "/lib64/", "/usr/lib/", "/usr/lib64/"]
                .iter()
                .any(|prefix| name.starts_with(prefix))
                || path.is_none();
            let short = match &path {
                // `/proc/self/exe` reads the running executable even if its
                // file was replaced since; its real name is for display.
                Some(p) if name.is_empty() => std::fs::read_link(p).ok(),
                Some(p) => Some(p.clone()),
                None => None,
            }
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "[vdso]".to_owned());
            modules.push(LoadedModule {
                path,
                name: short,
                bias,
                text,
                image,
                system,
            });
        }
        0
    }

    let mut modules: Vec<LoadedModule> = Vec::new();
    // SAFETY: `each` matches the callback signature and only touches the
    // Vec passed as `data`, which outlives the call.
    unsafe {
        libc::dl_iterate_phdr(Some(each), (&raw mut modules).cast());
    }
    modules
}

/// framehop's unwinder over the process's modules, and its rule cache.
pub(super) struct StackWalker {
    unwinder: UnwinderNative<Vec<u8>, MustNotAllocateDuringUnwind>,
    cache: Box<CacheNative<MustNotAllocateDuringUnwind>>,
}

impl StackWalker {
    pub(super) fn new(modules: &[LoadedModule]) -> Self {
        let mut unwinder = UnwinderNative::new();
        for module in modules {
            if let Some(framehop_module) = framehop_module(module) {
                unwinder.add_module(framehop_module);
            }
        }
        Self {
            unwinder,
            cache: Box::new(CacheNative::new_in()),
        }
    }

    /// The frames of `raw`, innermost first, as addresses to look up: the
    /// interrupted pc itself, then each return address minus one (inside the
    /// call instruction, so the line is the call's).
    pub(super) fn walk(&mut self, raw: &RawStack) -> Vec<u64> {
        let stack = &raw.stack;
        let base = raw.sp;
        let mut read_stack = |address: u64| -> Result<u64, ()> {
            let offset = usize::try_from(address.checked_sub(base).ok_or(())?).map_err(|_| ())?;
            let bytes = stack
                .get(offset..offset.checked_add(8).ok_or(())?)
                .ok_or(())?;
            Ok(u64::from_ne_bytes(bytes.try_into().map_err(|_| ())?))
        };
        let regs = initial_registers(&self.unwinder, raw);
        let mut frames = Vec::new();
        let mut iter = self
            .unwinder
            .iter_frames(raw.pc, regs, &mut *self.cache, &mut read_stack);
        while frames.len() < MAX_FRAMES {
            match iter.next() {
                Ok(Some(frame)) => frames.push(frame.address_for_lookup()),
                // The end of the stack, or as far as the rules and the copy go.
                Ok(None) | Err(_) => break,
            }
        }
        frames
    }
}

#[cfg(target_arch = "x86_64")]
fn initial_registers(
    _unwinder: &UnwinderNative<Vec<u8>, MustNotAllocateDuringUnwind>,
    raw: &RawStack,
) -> framehop::UnwindRegsNative {
    framehop::UnwindRegsNative::new(raw.pc, raw.sp, raw.fp)
}

#[cfg(target_arch = "aarch64")]
fn initial_registers(
    unwinder: &UnwinderNative<Vec<u8>, MustNotAllocateDuringUnwind>,
    raw: &RawStack,
) -> framehop::UnwindRegsNative {
    // Return addresses signed with pointer authentication (glibc built with
    // branch protection) carry a hash in their high bits: strip every bit
    // above the highest code address.
    let mask =
        framehop::aarch64::PtrAuthMask::from_max_known_address(unwinder.max_known_code_address());
    framehop::UnwindRegsNative::new_with_ptr_auth_mask(mask, raw.lr, raw.sp, raw.fp)
}

/// Reads a module's unwind sections. `None` when its file cannot be read:
/// framehop then unwinds its addresses by frame pointer.
fn framehop_module(module: &LoadedModule) -> Option<framehop::Module<Vec<u8>>> {
    match (&module.path, module.image) {
        (_, Some(image)) => framehop_module_from(module, image),
        (Some(path), None) => {
            // Read only the sections needed, not the whole file: a binary
            // with debug information can weigh hundreds of megabytes.
            let file = std::fs::File::open(path).ok()?;
            let cache = object::read::ReadCache::new(file);
            framehop_module_from(module, &cache)
        }
        (None, None) => None,
    }
}

fn framehop_module_from<'data, R: object::ReadRef<'data>>(
    module: &LoadedModule,
    data: R,
) -> Option<framehop::Module<Vec<u8>>> {
    let object = object::File::parse(data).ok()?;
    let section = |name: &str| object.section_by_name(name);
    let range = |name: &str| section(name).map(|s| s.address()..s.address() + s.size());
    let bytes = |name: &str| {
        section(name)
            .and_then(|s| s.data().ok())
            .map(<[u8]>::to_vec)
    };
    let info = ExplicitModuleSectionInfo {
        base_svma: 0,
        text_svma: range(".text"),
        got_svma: range(".got"),
        eh_frame_svma: range(".eh_frame"),
        eh_frame: bytes(".eh_frame"),
        eh_frame_hdr_svma: range(".eh_frame_hdr"),
        eh_frame_hdr: bytes(".eh_frame_hdr"),
        ..Default::default()
    };
    let start = module.text.iter().map(|r| r.start).min()?;
    let end = module.text.iter().map(|r| r.end).max()?;
    Some(framehop::Module::new(
        module.name.clone(),
        start..end,
        module.bias,
        info,
    ))
}
