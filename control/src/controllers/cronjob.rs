//! The CronJob controller's decisions: a Job from `jobTemplate` at each time the schedule
//! names (in `timeZone`), named `CRONJOB-MINUTES` after the scheduled time so that one time
//! never starts twice; `concurrencyPolicy` (Allow, Forbid, Replace); runs missed by more
//! than `startingDeadlineSeconds` skipped; finished Jobs kept up to the history limits; and
//! the status (`active`, `lastScheduleTime`, `lastSuccessfulTime`).

use serde_json::{json, Value};

use super::cron;
use super::job::finished;
use crate::api::{rfc3339, seconds};

/// The annotation a Job carries with the time it was scheduled for.
pub const SCHEDULED: &str = "batch.kubernetes.io/cronjob-scheduled-timestamp";

/// Missed start times beyond this many are reported (the most recent still starts).
const TOO_MANY_MISSED: usize = 100;
/// Missed times counted one by one before the search skips to the last week.
const CATCH_UP_STEPS: usize = 10_000;

/// What to do for one CronJob.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// A Job to create.
    pub create: Option<Value>,
    /// Names of Jobs to delete: past the history limits, or replaced.
    pub delete: Vec<String>,
    /// The status to write; `active` lists the Jobs running (the new one's reference is
    /// added once it exists).
    pub status: Value,
    /// Events to record: (type, reason, message).
    pub events: Vec<(&'static str, &'static str, String)>,
}

/// A reference to `job` as `status.active` lists it.
pub fn reference(job: &Value) -> Value {
    let m = &job["metadata"];
    json!({"apiVersion": "batch/v1", "kind": "Job", "name": m["name"],
        "namespace": m["namespace"], "uid": m["uid"]})
}

/// Plan for `cj` given the Jobs it owns, at `now` (unix seconds).
pub fn plan(cj: &Value, jobs: &[&Value], now: i64) -> Plan {
    let spec = &cj["spec"];
    let name = cj["metadata"]["name"].as_str().unwrap_or("");
    let mut plan = Plan::default();
    let (mut running, mut succeeded, mut failed) = (Vec::new(), Vec::new(), Vec::new());
    for j in jobs {
        if !j["metadata"]["deletionTimestamp"].is_null() {
            continue;
        }
        match finished(j).map(|c| c["type"].as_str().unwrap_or("")) {
            None => running.push(*j),
            Some("Complete") => succeeded.push(*j),
            Some(_) => failed.push(*j),
        }
    }
    let old = &cj["status"];
    let mut last_success = seconds(&old["lastSuccessfulTime"]);
    for j in &succeeded {
        let done = seconds(&j["status"]["completionTime"]);
        if done > last_success {
            last_success = done;
        }
    }
    // Finished Jobs beyond the limits go, oldest first.
    for (list, limit) in [
        (&mut succeeded, "successfulJobsHistoryLimit"),
        (&mut failed, "failedJobsHistoryLimit"),
    ] {
        let keep = spec[limit]
            .as_u64()
            .unwrap_or(if limit.starts_with('s') { 3 } else { 1 }) as usize;
        list.sort_by_key(|j| {
            (
                seconds(&j["status"]["startTime"])
                    .or_else(|| seconds(&j["metadata"]["creationTimestamp"])),
                j["metadata"]["name"].as_str().unwrap_or("").to_string(),
            )
        });
        let excess = list.len().saturating_sub(keep);
        for j in list.drain(..excess) {
            let n = j["metadata"]["name"].as_str().unwrap_or("").to_string();
            plan.events
                .push(("Normal", "SuccessfulDelete", format!("Deleted job {n}")));
            plan.delete.push(n);
        }
    }
    let mut status = json!({
        "active": running.iter().map(|j| reference(j)).collect::<Vec<_>>(),
        "lastScheduleTime": old["lastScheduleTime"],
    });
    if let Some(t) = last_success {
        status["lastSuccessfulTime"] = json!(rfc3339(t));
    }
    if spec["suspend"] == true || !cj["metadata"]["deletionTimestamp"].is_null() {
        plan.status = status;
        return plan;
    }
    let schedule = match cron::parse(spec["schedule"].as_str().unwrap_or("")) {
        Ok(s) => s,
        Err(e) => {
            plan.events.push((
                "Warning",
                "UnparseableSchedule",
                format!("unparseable schedule: {e}"),
            ));
            plan.status = status;
            return plan;
        }
    };
    let tz = match cron::zone(spec["timeZone"].as_str()) {
        Ok(tz) => tz,
        Err(e) => {
            plan.events.push(("Warning", "UnknownTimeZone", e));
            plan.status = status;
            return plan;
        }
    };
    // The most recent scheduled time not yet started, no older than the deadline allows.
    let mut earliest = seconds(&old["lastScheduleTime"])
        .or_else(|| seconds(&cj["metadata"]["creationTimestamp"]))
        .unwrap_or(now);
    if let Some(d) = spec["startingDeadlineSeconds"].as_i64() {
        earliest = earliest.max(now - d);
    }
    let Ok(mut t) = jiff::Timestamp::from_second(earliest) else {
        plan.status = status;
        return plan;
    };
    let (mut due, mut missed) = (None, 0);
    while let Some(next) = schedule.next_after(t, &tz) {
        if next.as_second() > now {
            break;
        }
        due = Some(next);
        missed += 1;
        t = next;
        // A frequent schedule left for months: count no further, look at the last week.
        if missed == CATCH_UP_STEPS {
            let week = jiff::Timestamp::from_second(now - 7 * 86_400).unwrap_or(t);
            t = t.max(week);
        }
    }
    let Some(due) = due else {
        plan.status = status;
        return plan;
    };
    if missed > TOO_MANY_MISSED {
        plan.events.push((
            "Warning",
            "TooManyMissedTimes",
            format!("too many missed start times: {missed}. Set or decrease .spec.startingDeadlineSeconds or check clock skew"),
        ));
    }
    let job_name = format!("{name}-{}", due.as_second() / 60);
    if jobs
        .iter()
        .any(|j| j["metadata"]["name"] == job_name.as_str())
    {
        // Started already; the status may not say so yet.
        status["lastScheduleTime"] = json!(rfc3339(due.as_second()));
        plan.status = status;
        return plan;
    }
    match spec["concurrencyPolicy"].as_str() {
        Some("Forbid") if !running.is_empty() => {
            plan.events.push((
                "Normal",
                "JobAlreadyActive",
                "Not starting job because prior execution is running and concurrency policy is Forbid".into(),
            ));
            plan.status = status;
            return plan;
        }
        Some("Replace") => {
            for j in running.drain(..) {
                let n = j["metadata"]["name"].as_str().unwrap_or("").to_string();
                plan.events
                    .push(("Normal", "SuccessfulDelete", format!("Deleted job {n}")));
                plan.delete.push(n);
            }
            status["active"] = json!([]);
        }
        _ => {}
    }
    let template = &spec["jobTemplate"];
    let mut annotations = template["metadata"]["annotations"].clone();
    if !annotations.is_object() {
        annotations = json!({});
    }
    // RFC 3339 in the CronJob's zone, `Z` for UTC, as Kubernetes writes it.
    let local = due.to_zoned(tz);
    let format = if local.offset().seconds() == 0 {
        "%Y-%m-%dT%H:%M:%SZ"
    } else {
        "%Y-%m-%dT%H:%M:%S%:z"
    };
    annotations[SCHEDULED] = json!(local.strftime(format).to_string());
    plan.create = Some(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {
            "name": job_name,
            "namespace": cj["metadata"]["namespace"],
            "labels": template["metadata"]["labels"],
            "annotations": annotations,
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "CronJob", "name": name,
                "uid": cj["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": template["spec"],
    }));
    plan.events.push((
        "Normal",
        "SuccessfulCreate",
        format!("Created job {job_name}"),
    ));
    status["lastScheduleTime"] = json!(rfc3339(due.as_second()));
    plan.status = status;
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_796_467_200; // 2026-12-05T10:40:00Z

    fn cronjob(extra: Value) -> Value {
        let mut cj = json!({"metadata": {"name": "tick", "namespace": "default", "uid": "cj-1",
                "creationTimestamp": rfc3339(T0 - 30)},
            "spec": {"schedule": "*/5 * * * *", "concurrencyPolicy": "Allow",
                "successfulJobsHistoryLimit": 3, "failedJobsHistoryLimit": 1,
                "jobTemplate": {"metadata": {"labels": {"app": "tick"}},
                    "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "module:hello"}]}}}}}});
        if let Some(m) = extra.as_object() {
            for (k, v) in m {
                cj["spec"][k] = v.clone();
            }
        }
        cj
    }

    fn job(name: &str, state: Option<&str>, start: i64) -> Value {
        let mut j = json!({"metadata": {"name": name, "namespace": "default", "uid": name,
                "creationTimestamp": rfc3339(start)},
            "status": {"startTime": rfc3339(start)}});
        if let Some(s) = state {
            j["status"]["conditions"] = json!([{"type": s, "status": "True"}]);
            j["status"]["completionTime"] = json!(rfc3339(start + 10));
        }
        j
    }

    #[test]
    fn starts_once_per_scheduled_time() {
        let cj = cronjob(json!({}));
        // Before the first time nothing starts.
        let p = plan(&cj, &[], T0 - 10);
        assert!(p.create.is_none());
        // At 10:40 the run of 10:40 starts, named after its minute.
        let p = plan(&cj, &[], T0 + 1);
        let created = p.create.unwrap();
        assert_eq!(created["metadata"]["name"], format!("tick-{}", T0 / 60));
        assert_eq!(created["metadata"]["labels"]["app"], "tick");
        assert_eq!(created["metadata"]["ownerReferences"][0]["uid"], "cj-1");
        assert_eq!(
            created["metadata"]["annotations"][SCHEDULED],
            "2026-12-05T10:40:00Z"
        );
        assert_eq!(p.status["lastScheduleTime"], rfc3339(T0));
        // Seen already (the status not yet written): not again.
        let running = job(&format!("tick-{}", T0 / 60), None, T0);
        let p = plan(&cj, &[&running], T0 + 30);
        assert!(p.create.is_none());
        assert_eq!(p.status["active"][0]["name"], running["metadata"]["name"]);
        assert_eq!(p.status["lastScheduleTime"], rfc3339(T0));
    }

    #[test]
    fn concurrency_policies() {
        let mut cj = cronjob(json!({"concurrencyPolicy": "Forbid"}));
        cj["status"] = json!({"lastScheduleTime": rfc3339(T0)});
        let running = job("tick-old", None, T0);
        let p = plan(&cj, &[&running], T0 + 301);
        assert!(p.create.is_none());
        assert_eq!(p.events[0].1, "JobAlreadyActive");
        cj["spec"]["concurrencyPolicy"] = json!("Replace");
        let p = plan(&cj, &[&running], T0 + 301);
        assert!(p.create.is_some());
        assert_eq!(p.delete, vec!["tick-old".to_string()]);
        assert_eq!(p.status["active"], json!([]));
        cj["spec"]["concurrencyPolicy"] = json!("Allow");
        let p = plan(&cj, &[&running], T0 + 301);
        assert!(p.create.is_some() && p.delete.is_empty());
        // Suspended: nothing starts.
        cj["spec"]["suspend"] = json!(true);
        assert!(plan(&cj, &[&running], T0 + 301).create.is_none());
    }

    #[test]
    fn missed_times_and_deadlines() {
        let mut cj = cronjob(json!({}));
        cj["status"] = json!({"lastScheduleTime": rfc3339(T0)});
        // Down for an hour: only the most recent missed time starts.
        let p = plan(&cj, &[], T0 + 3600 + 20);
        assert_eq!(
            p.create.unwrap()["metadata"]["name"],
            format!("tick-{}", (T0 + 3600) / 60)
        );
        // With a 10 s deadline, a time 20 s ago is skipped.
        cj["spec"]["startingDeadlineSeconds"] = json!(10);
        assert!(plan(&cj, &[], T0 + 3600 + 20).create.is_none());
        // Too many missed (every minute for a day) is reported.
        let mut every = cronjob(json!({"schedule": "* * * * *"}));
        every["status"] = json!({"lastScheduleTime": rfc3339(T0)});
        let p = plan(&every, &[], T0 + 86_400);
        assert!(p.events.iter().any(|e| e.1 == "TooManyMissedTimes"));
        assert!(p.create.is_some());
        // Left for a year, it still starts the latest time, not one from months ago.
        let p = plan(&every, &[], T0 + 365 * 86_400 + 20);
        assert_eq!(
            p.create.unwrap()["metadata"]["name"],
            format!("tick-{}", (T0 + 365 * 86_400) / 60)
        );
    }

    #[test]
    fn history_limits_and_last_success() {
        let cj = cronjob(json!({"successfulJobsHistoryLimit": 1, "failedJobsHistoryLimit": 1}));
        let (a, b) = (
            job("tick-a", Some("Complete"), T0 - 600),
            job("tick-b", Some("Complete"), T0 - 300),
        );
        let (c, d) = (
            job("tick-c", Some("Failed"), T0 - 900),
            job("tick-d", Some("Failed"), T0 - 200),
        );
        let p = plan(&cj, &[&a, &b, &c, &d], T0 - 100);
        assert_eq!(p.delete, vec!["tick-a".to_string(), "tick-c".to_string()]);
        assert_eq!(p.status["lastSuccessfulTime"], rfc3339(T0 - 290));
    }

    #[test]
    fn bad_schedules_and_zones_are_reported() {
        let p = plan(&cronjob(json!({"schedule": "61 * * * *"})), &[], T0 + 1);
        assert!(p.create.is_none());
        assert_eq!(p.events[0].1, "UnparseableSchedule");
        let p = plan(&cronjob(json!({"timeZone": "Nowhere/City"})), &[], T0 + 1);
        assert_eq!(p.events[0].1, "UnknownTimeZone");
        // In a zone, the annotation carries the local time.
        let p = plan(&cronjob(json!({"timeZone": "Asia/Tokyo"})), &[], T0 + 1);
        assert_eq!(
            p.create.unwrap()["metadata"]["annotations"][SCHEDULED],
            "2026-12-05T19:40:00+09:00"
        );
    }
}
