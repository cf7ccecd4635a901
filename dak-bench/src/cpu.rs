//! CPU time of the processes under test over a run (`--cpu-pid`), and the
//! generator's own: user + system time from `/proc/<pid>/stat` (Linux), the
//! figure docs/performance.md gives beside each throughput.

/// Clock ticks per second of `/proc/<pid>/stat`'s times: Linux reports them
/// in `USER_HZ`, which is 100 on every architecture dak builds for.
const TICKS_PER_S: f64 = 100.0;

/// utime + stime, in ticks, from the text of `/proc/<pid>/stat`. The
/// process's name (field 2) is in parentheses and may itself hold spaces and
/// parentheses, so the fields are counted after its last `)`: the state is
/// field 3, utime 14 and stime 15.
fn ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn read(pid: &str) -> Option<u64> {
    ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The CPU time of a set of processes, counted from [`Cpu::start`].
pub(crate) struct Cpu {
    pids: Vec<u32>,
    start: Vec<u64>,
    own: Option<u64>,
}

/// What [`Cpu::measured`] found.
#[derive(Debug)]
pub(crate) struct Measured {
    /// CPU seconds of the processes given; `None` when none were, or when one
    /// of them ended before the run did (its time is gone with it).
    pub processes_s: Option<f64>,
    /// CPU seconds of the generator itself.
    pub generator_s: Option<f64>,
    /// The processes that ended during the run.
    pub ended: Vec<u32>,
}

impl Cpu {
    /// Starts counting. Fails for a process that is not there (or not
    /// readable), so a run is not measured against the wrong process.
    pub fn start(pids: &[u32]) -> anyhow::Result<Self> {
        let start = pids
            .iter()
            .map(|&pid| {
                read(&pid.to_string()).ok_or_else(|| {
                    anyhow::anyhow!(
                        "--cpu-pid {pid}: no such process, or /proc/{pid}/stat unreadable"
                    )
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            pids: pids.to_vec(),
            start,
            own: read("self"),
        })
    }

    pub fn measured(&self) -> Measured {
        let seconds = |ticks: u64| ticks as f64 / TICKS_PER_S;
        let mut total = 0;
        let mut ended = Vec::new();
        for (&pid, &start) in self.pids.iter().zip(&self.start) {
            match read(&pid.to_string()) {
                Some(now) => total += now.saturating_sub(start),
                None => ended.push(pid),
            }
        }
        let processes_s = (!self.pids.is_empty() && ended.is_empty()).then(|| seconds(total));
        let generator_s = self
            .own
            .zip(read("self"))
            .map(|(start, now)| seconds(now.saturating_sub(start)));
        Measured {
            processes_s,
            generator_s,
            ended,
        }
    }
}

/// CPU seconds per 1,000 messages delivered; `None` when nothing was.
pub(crate) fn per_thousand(cpu_s: f64, delivered: u64) -> Option<f64> {
    (delivered > 0).then(|| cpu_s / delivered as f64 * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_read_after_a_name_with_spaces_and_parentheses() {
        let stat = "4242 (dak (up) x) S 1 4242 4242 0 -1 4194560 1 0 0 0 \
                    1234 56 0 0 20 0 9 0 100 1000 200 18446744073709551615";
        assert_eq!(ticks(stat), Some(1290));
        assert_eq!(ticks("4242 (dak) S 1 2"), None);
        assert_eq!(ticks("no name here"), None);
    }

    #[test]
    fn per_thousand_divides_by_what_was_delivered() {
        assert_eq!(per_thousand(42.0, 525_000), Some(0.08));
        assert_eq!(per_thousand(1.0, 0), None);
    }

    #[test]
    fn a_process_that_is_not_there_is_refused() {
        // Process ids stop below 2^22 on Linux.
        let err = Cpu::start(&[u32::MAX]).err().expect("refused");
        assert!(err.to_string().contains("--cpu-pid"), "{err}");
    }

    #[test]
    fn the_time_a_process_spends_on_a_core_is_counted() {
        let me = std::process::id();
        let cpu = Cpu::start(&[me]).unwrap();
        // Spin until the kernel has charged this process 0.2 s more.
        let until = read("self").unwrap() + 20;
        let mut spins = 0u64;
        while read("self").unwrap() < until {
            spins = std::hint::black_box(spins.wrapping_add(1));
        }
        let measured = cpu.measured();
        assert!(measured.processes_s.unwrap() >= 0.2, "{measured:?}");
        assert!(measured.generator_s.unwrap() >= 0.2, "{measured:?}");
        assert!(measured.ended.is_empty());
        let none = Cpu::start(&[]).unwrap().measured();
        assert_eq!(none.processes_s, None);
    }
}
