//! What a hit does, whichever way it arrived (a trap or a jump): count it, record the events its
//! consumers want, hijack the return of a return-probed function.

use core::sync::atomic::Ordering;

use super::events;
use super::ret;
use super::stacks::Captured;
use super::table::{ReadGuard, Table, TableEntry, TIMED};
use super::thread::{self, Counting};
use super::unwind::Regs;

/// Is this thread running libuprobe code (or is it a runtime thread)?
pub fn in_runtime() -> bool {
    let t = thread::tls();
    t.depth.load(Ordering::Relaxed) != 0 || thread::on_runtime_stack()
}

/// Count a hit and give its consumers what they want; `frame`: rsp and rbp at the hit, to
/// hijack the return of a return-probed function and unwind the stacks of `%stack` consumers
/// (None: the instruction did not run); `guard`: the caller's hold on `table`, under
/// which the stack is unwound too.
#[inline(always)]
pub fn count(
    guard: &ReadGuard,
    counting: &Counting,
    entry: &TableEntry,
    table: &Table,
    site: u64,
    args: [u64; 6],
    frame: Option<(u64, u64)>,
) {
    if matches!(counting, Counting::No) {
        return;
    }
    counting.bump(entry.counter);
    let consumers = table.consumers_of(entry);
    let tracing = events::TRACING.load(Ordering::Relaxed);
    if tracing {
        for c in consumers {
            events::record_entry(counting.block(), c, args);
        }
    }
    let rsp0 = frame.map(|f| f.0);
    if let (true, Some((sp, rbp))) = (consumers.iter().any(|c| c.stack), frame) {
        let stack = Captured::take(guard, Regs { pc: site, sp, bp: rbp });
        for c in consumers.iter().filter(|c| c.stack) {
            stack.count_for(c.id);
        }
    }
    if let (true, Some(rsp0)) = (consumers.iter().any(|c| c.ret), rsp0) {
        let timed = entry.flags & TIMED != 0;
        let h = ret::Hijack { site, counter: entry.ret_counter, timed, slow: timed || tracing };
        ret::hijack(counting.block(), rsp0, &h, consumers);
    }
}
