//! IFUNC symbols (`strlen`, `memcpy`, ... in glibc): the implementation this process calls is
//! probed, not the resolver. It is found as the dynamic linker finds it on x86-64: by calling the
//! resolver, with no arguments, once its object is relocated (the caller sees to that). Called
//! directly, not through `dlsym`, so that resolving thousands of them (`libc.so.6:*`) never enters
//! libc's probed code.

use crate::objects::{ElfFile, FuncSym, LoadedObject, MapEntry};

/// The address the IFUNC `f` of `obj` resolves to in this process.
pub fn resolve(obj: &LoadedObject, elf: &ElfFile, f: &FuncSym, maps: &[MapEntry]) -> Option<u64> {
    let off = elf.file_offset(f.vaddr)?;
    let m =
        maps.iter().find(|m| m.file == Some(obj.id) && m.is_exec() && m.addr_of(off).is_some())?;
    let resolver = m.addr_of(off)?;
    // SAFETY: `resolver` is the IFUNC's resolver in a mapped, relocated object: a function of no
    // arguments that returns the implementation's address, as the dynamic linker calls it.
    let f: extern "C" fn() -> u64 = unsafe { core::mem::transmute(resolver as usize) };
    let addr = f();
    (addr != 0).then_some(addr)
}
