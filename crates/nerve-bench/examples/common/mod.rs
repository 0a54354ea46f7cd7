//! The timing loop of the `*_parts` examples.

use nerve_core::Result;

/// Times the parts of a workload. With a filter (the example's first argument) only the parts
/// whose name contains it run, 200 times each (for a profiler); otherwise every part runs 21
/// times.
pub struct Timer {
    only: Option<String>,
}

impl Timer {
    /// A timer filtered by the first command-line argument, if any.
    pub fn from_args() -> Timer {
        Timer {
            only: std::env::args().nth(1),
        }
    }

    /// Run `f` once to warm up, then time it and print the median and the minimum (on a
    /// shared machine the figure least disturbed by others).
    pub fn time(&self, name: &str, f: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        if self
            .only
            .as_ref()
            .is_some_and(|o| !name.contains(o.as_str()))
        {
            return Ok(());
        }
        f()?;
        let runs = if self.only.is_some() { 200 } else { 21 };
        let mut ms: Vec<f64> = (0..runs)
            .map(|_| {
                let t = std::time::Instant::now();
                f().map(|_| t.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<Result<_>>()?;
        ms.sort_by(f64::total_cmp);
        println!(
            "{name:<48} {:8.3} ms median {:8.3} ms min",
            ms[ms.len() / 2],
            ms[0]
        );
        Ok(())
    }
}
