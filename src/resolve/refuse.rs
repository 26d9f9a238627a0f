//! Functions libuprobe refuses to probe in some way, and why.

/// Functions a return probe would break: they return twice (the second return finds its frame
/// gone), return on another stack, or look at their own return address to find their caller (and
/// would find the return trampoline).
const RETURN_REFUSED: &[(&str, &str)] = &[
    ("vfork", "it returns twice on one stack (in the child, then in the parent)"),
    ("__vfork", "it returns twice on one stack (in the child, then in the parent)"),
    ("setjmp", "it returns twice (again at each longjmp)"),
    ("_setjmp", "it returns twice (again at each longjmp)"),
    ("__sigsetjmp", "it returns twice (again at each longjmp)"),
    ("sigsetjmp", "it returns twice (again at each longjmp)"),
    ("getcontext", "it returns twice (again at each setcontext)"),
    ("swapcontext", "it returns on another context's stack"),
    ("dlopen", "it finds its caller's object from its own return address"),
    ("dlmopen", "it finds its caller's object from its own return address"),
    ("dlsym", "it finds its caller's object from its own return address (RTLD_NEXT)"),
    ("dlvsym", "it finds its caller's object from its own return address (RTLD_NEXT)"),
    ("__libc_dlopen_mode", "it finds its caller's object from its own return address"),
    ("__libc_dlsym", "it finds its caller's object from its own return address"),
    ("_Unwind_RaiseException", "the unwinder starts from its own return address"),
    ("_Unwind_Resume", "the unwinder starts from its own return address"),
    ("_Unwind_Resume_or_Rethrow", "the unwinder starts from its own return address"),
    ("_Unwind_ForcedUnwind", "the unwinder starts from its own return address"),
    ("_Unwind_Backtrace", "the unwinder starts from its own return address"),
    ("backtrace", "it unwinds from its own return address"),
];

/// Why a return probe on the function with these names (aliases at one address) is refused.
pub fn return_refused(names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| {
        let base = n.split('@').next().unwrap_or(n);
        RETURN_REFUSED.iter().find(|(name, _)| *name == base).map(|(_, why)| why.to_string())
    })
}
