//! The Job controller's decisions: pods until `completions` have succeeded, at most
//! `parallelism` at once; failure after more than `backoffLimit` failed pods or past
//! `activeDeadlineSeconds`; deletion `ttlSecondsAfterFinished` after the end. After a failed
//! pod the next one waits, 10 s doubling with each failure up to 6 minutes, as in
//! Kubernetes. An `Indexed` Job runs one pod per completion index (0 to `completions`-1, in
//! the annotation and label `batch.kubernetes.io/job-completion-index`, the environment
//! variable `JOB_COMPLETION_INDEX` and the host name `JOB-INDEX`), completes when every index
//! has succeeded once, and reports them as `completedIndexes` (`0-2,5`). What was counted
//! stays counted: a finished pod deleted later (by hand, by a drain) changes no count. A
//! suspended Job's running pods are deleted and its start cleared, with a `Suspended`
//! condition; resumed, it starts again.
//!
//! A `podFailurePolicy` looks at each failed pod: the first rule whose exit codes (of a
//! container that ended non-zero) or pod conditions match decides, `FailJob` ending the Job
//! at once, `Ignore` leaving the failure uncounted, `FailIndex` failing the pod's index,
//! `Count` counting it as usual. With `backoffLimitPerIndex` an Indexed Job counts failures
//! per index: an index failing more often is given up (`failedIndexes`), the others go on,
//! and the Job fails once every index has finished if any failed, or as soon as more than
//! `maxFailedIndexes` have.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::replicaset::active;
use crate::api::seconds;

/// What to do for one Job.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub create: usize,
    /// For an `Indexed` Job, the completion indexes of the pods to create (`create` of them).
    pub indexes: Vec<u64>,
    /// Pods to delete (the active ones of a Job that failed).
    pub delete: Vec<String>,
    /// The status to write (conditions and counts).
    pub status: Value,
    /// The Job's time to live after it finished is over.
    pub expire: bool,
    /// Pods are held back by the failure back-off: look again later.
    pub backing_off: bool,
    /// Events to record once the status is written: (type, reason, message).
    pub events: Vec<(&'static str, String, String)>,
}

/// How long after its latest failure a Job with `failed` failed pods waits for its next pod.
pub fn backoff_delay(failed: u64) -> i64 {
    if failed == 0 {
        return 0;
    }
    (10i64 << (failed - 1).min(6)).min(360)
}

/// The condition that ended the Job, if one did.
pub fn finished(job: &Value) -> Option<&Value> {
    job["status"]["conditions"].as_array()?.iter().find(|c| {
        matches!(c["type"].as_str(), Some("Complete" | "Failed")) && c["status"] == "True"
    })
}

/// What a pod failure policy decides for one failed pod.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    Count,
    Ignore,
    FailIndex,
    /// Fail the Job, with the message Kubernetes writes.
    FailJob(String),
}

/// The first rule of `spec.podFailurePolicy` that `pod` (failed) matches, or `Count`.
fn verdict(spec: &Value, pod: &Value) -> Verdict {
    let rules = spec["podFailurePolicy"]["rules"].as_array();
    let name = format!(
        "{}/{}",
        pod["metadata"]["namespace"].as_str().unwrap_or("default"),
        pod["metadata"]["name"].as_str().unwrap_or("")
    );
    for (i, rule) in rules.into_iter().flatten().enumerate() {
        let action = rule["action"].as_str().unwrap_or("Count");
        let mut why = None;
        let codes = &rule["onExitCodes"];
        if codes.is_object() {
            let values: Vec<i64> = codes["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_i64)
                .collect();
            let inside = codes["operator"] == "In";
            let container = codes["containerName"].as_str();
            why = pod["status"]["containerStatuses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| container.is_none_or(|n| c["name"] == n))
                .find_map(|c| {
                    let code = c["state"]["terminated"]["exitCode"].as_i64()?;
                    (code != 0 && values.contains(&code) == inside).then(|| {
                        format!(
                            "Container {} for pod {name} failed with exit code {code} matching {action} rule at index {i}",
                            c["name"].as_str().unwrap_or("")
                        )
                    })
                });
        } else if let Some(wanted) = rule["onPodConditions"].as_array() {
            why = wanted.iter().find_map(|w| {
                let status = w["status"].as_str().unwrap_or("True");
                pod["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .any(|c| c["type"] == w["type"] && c["status"] == status)
                    .then(|| {
                        format!(
                            "Pod {name} has condition {} matching {action} rule at index {i}",
                            w["type"].as_str().unwrap_or("")
                        )
                    })
            });
        }
        if let Some(why) = why {
            return match action {
                "FailJob" => Verdict::FailJob(why),
                "Ignore" => Verdict::Ignore,
                "FailIndex" => Verdict::FailIndex,
                _ => Verdict::Count,
            };
        }
    }
    Verdict::Count
}

/// Plan for `job` given its pods, at `now` (unix seconds; `stamp` is the same as RFC 3339);
/// `failed_at` is when its number of failed pods last grew, if known.
pub fn plan(job: &Value, pods: &[&Value], now: i64, stamp: &str, failed_at: Option<i64>) -> Plan {
    let spec = &job["spec"];
    let completions = spec["completions"].as_u64().unwrap_or(1);
    let parallelism = spec["parallelism"].as_u64().unwrap_or(1);
    let backoff = spec["backoffLimit"].as_u64().unwrap_or(6);
    let per_index = spec["backoffLimitPerIndex"].as_u64();
    let mut succeeded = pods
        .iter()
        .filter(|x| x["status"]["phase"] == "Succeeded")
        .count() as u64;
    // Failed pods as the policy counts them; failures per index; indexes given up.
    let (mut failed, mut fail_job) = (0u64, None);
    let mut per: std::collections::BTreeMap<u64, u64> = Default::default();
    let mut given_up: BTreeSet<u64> = BTreeSet::new();
    for p in pods.iter().filter(|x| x["status"]["phase"] == "Failed") {
        match verdict(spec, p) {
            Verdict::Ignore => continue,
            Verdict::FailJob(why) => {
                fail_job.get_or_insert(why);
            }
            Verdict::FailIndex => given_up.extend(index_of(p)),
            Verdict::Count => {}
        }
        failed += 1;
        if let Some(i) = index_of(p) {
            *per.entry(i).or_default() += 1;
        }
    }
    if let Some(limit) = per_index {
        given_up.extend(per.iter().filter(|(_, n)| **n > limit).map(|(i, _)| *i));
    }
    let running: Vec<&Value> = pods.iter().copied().filter(|p| active(p)).collect();
    let indexed = spec["completionMode"] == "Indexed";
    // What was counted stays counted, as the job controller's tracking keeps it: a finished
    // pod deleted (by hand, by a drain) leaves the Job's counts as they were.
    let was = &job["status"];
    succeeded = succeeded.max(was["succeeded"].as_u64().unwrap_or(0));
    failed = failed.max(was["failed"].as_u64().unwrap_or(0));
    given_up.extend(parse_ranges(was["failedIndexes"].as_str().unwrap_or("")));
    // An Indexed Job counts each index once however many of its pods succeeded.
    let mut done: BTreeSet<u64> = pods
        .iter()
        .filter(|p| p["status"]["phase"] == "Succeeded")
        .filter_map(|p| index_of(p))
        .filter(|i| *i < completions)
        .collect();
    done.extend(parse_ranges(was["completedIndexes"].as_str().unwrap_or("")));
    if indexed {
        succeeded = done.len() as u64;
    }
    let suspended = spec["suspend"] == true;
    let was_suspended = condition_is(was, "Suspended", "True");
    let ready = running
        .iter()
        .filter(|p| super::replicaset::ready(p))
        .count();
    // A suspended Job has no start; one resumed starts again (its deadline with it).
    let start = match was["startTime"].as_str() {
        _ if suspended && finished(job).is_none() => None,
        Some(t) if !was_suspended => Some(t.to_string()),
        _ => Some(stamp.to_string()),
    };
    let mut status = json!({
        "active": running.len(), "succeeded": succeeded, "failed": failed, "ready": ready,
        "startTime": start,
    });
    let mut conditions = was["conditions"].as_array().cloned().unwrap_or_default();
    if indexed {
        status["completedIndexes"] = json!(ranges(&done));
        if per_index.is_some() {
            status["failedIndexes"] = json!(ranges(&given_up));
        }
    }
    let mut plan = Plan::default();
    if let Some(done) = finished(job) {
        status["conditions"] = job["status"]["conditions"].clone();
        status["completionTime"] = job["status"]["completionTime"].clone();
        let ended = seconds(&done["lastTransitionTime"]).unwrap_or(now);
        plan.expire = spec["ttlSecondsAfterFinished"]
            .as_i64()
            .is_some_and(|ttl| now >= ended + ttl);
        plan.status = status;
        return plan;
    }
    let deadline = spec["activeDeadlineSeconds"]
        .as_i64()
        .zip(start.as_ref().and_then(|s| seconds(&json!(s))))
        .is_some_and(|(d, s)| now >= s + d);
    let max_failed = spec["maxFailedIndexes"].as_u64();
    let every_index_ended = (0..completions).all(|i| done.contains(&i) || given_up.contains(&i));
    let failure = if let Some(why) = &fail_job {
        Some(("PodFailurePolicy", why.as_str()))
    } else if failed > backoff {
        Some((
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        ))
    } else if max_failed.is_some_and(|m| given_up.len() as u64 > m) {
        Some((
            "MaxFailedIndexesExceeded",
            "Job has exceeded the specified maximal number of failed indexes",
        ))
    } else if indexed && !given_up.is_empty() && every_index_ended {
        Some(("FailedIndexes", "Job has failed indexes"))
    } else if deadline {
        Some((
            "DeadlineExceeded",
            "Job was active longer than specified deadline",
        ))
    } else {
        None
    };
    let names = || {
        running
            .iter()
            .filter_map(|p| p["metadata"]["name"].as_str().map(String::from))
            .collect()
    };
    if let Some((reason, message)) = failure {
        set_condition(&mut conditions, "Failed", "True", reason, message, stamp);
        plan.events.push(("Warning", reason.into(), message.into()));
        plan.delete = names();
    } else if succeeded >= completions {
        set_condition(
            &mut conditions,
            "Complete",
            "True",
            "CompletionsReached",
            "Reached expected number of succeeded pods",
            stamp,
        );
        status["completionTime"] = json!(stamp);
        plan.events
            .push(("Normal", "Completed".into(), "Job completed".into()));
    } else if suspended {
        // As Kubernetes: its running pods go, and it says so.
        plan.delete = names();
        if !was_suspended {
            set_condition(
                &mut conditions,
                "Suspended",
                "True",
                "JobSuspended",
                "Job suspended",
                stamp,
            );
            plan.events
                .push(("Normal", "Suspended".into(), "Job suspended".into()));
        }
    } else {
        if was_suspended {
            set_condition(
                &mut conditions,
                "Suspended",
                "False",
                "JobResumed",
                "Job resumed",
                stamp,
            );
            plan.events
                .push(("Normal", "Resumed".into(), "Job resumed".into()));
        }
        let want = parallelism.min(completions - succeeded) as usize;
        plan.create = want.saturating_sub(running.len());
        if indexed {
            let busy: BTreeSet<u64> = running.iter().filter_map(|p| index_of(p)).collect();
            plan.indexes = (0..completions)
                .filter(|i| !done.contains(i) && !busy.contains(i) && !given_up.contains(i))
                .take(plan.create)
                .collect();
            plan.create = plan.indexes.len();
        }
        if plan.create > 0 && failed_at.is_some_and(|t| now < t + backoff_delay(failed)) {
            plan.create = 0;
            plan.indexes.clear();
            plan.backing_off = true;
        }
    }
    if !conditions.is_empty() {
        status["conditions"] = json!(conditions);
    }
    plan.status = status;
    plan
}

/// Whether `status` has a condition of type `t` with status `s`.
fn condition_is(status: &Value, t: &str, s: &str) -> bool {
    status["conditions"]
        .as_array()
        .is_some_and(|l| l.iter().any(|c| c["type"] == t && c["status"] == s))
}

/// Set the condition `t` in `list`, its transition time moving only when its status does.
fn set_condition(list: &mut Vec<Value>, t: &str, s: &str, reason: &str, message: &str, at: &str) {
    let new = json!({"type": t, "status": s, "reason": reason, "message": message,
        "lastProbeTime": at, "lastTransitionTime": at});
    match list.iter_mut().find(|c| c["type"] == t) {
        Some(c) if c["status"] == s => {
            c["reason"] = json!(reason);
            c["message"] = json!(message);
            c["lastProbeTime"] = json!(at);
        }
        Some(c) => *c = new,
        None => list.push(new),
    }
}

/// The indexes of a `completedIndexes`-style list (`0-2,5`).
fn parse_ranges(s: &str) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(a), Ok(b)) = (a.trim().parse::<u64>(), b.trim().parse::<u64>()) {
            // A bound keeps a garbled status from making a huge set.
            out.extend(a..=b.min(a + 100_000));
        }
    }
    out
}

/// A new pod for `job`.
pub fn pod_for(job: &Value) -> Value {
    super::replicaset::pod_from(job, "batch/v1", "Job")
}

const INDEX: &str = "batch.kubernetes.io/job-completion-index";

/// A pod's completion index, from its label: the controllers' pod cache keeps labels, not
/// annotations.
fn index_of(pod: &Value) -> Option<u64> {
    pod["metadata"]["labels"][INDEX].as_str()?.parse().ok()
}

/// A new pod for completion index `i` of an `Indexed` Job.
pub fn pod_for_index(job: &Value, i: u64) -> Value {
    let mut p = pod_for(job);
    let name = job["metadata"]["name"].as_str().unwrap_or("");
    let meta = &mut p["metadata"];
    meta["generateName"] = json!(format!("{name}-{i}-"));
    for k in ["annotations", "labels"] {
        if !meta[k].is_object() {
            meta[k] = json!({});
        }
        meta[k][INDEX] = json!(i.to_string());
    }
    let spec = &mut p["spec"];
    if spec["hostname"].is_null() {
        spec["hostname"] = json!(format!("{name}-{i}"));
    }
    for k in ["initContainers", "containers"] {
        for c in spec[k].as_array_mut().into_iter().flatten() {
            if !c["env"].is_array() {
                c["env"] = json!([]);
            }
            if let Some(env) = c["env"].as_array_mut() {
                env.push(json!({"name": "JOB_COMPLETION_INDEX", "value": i.to_string()}));
            }
        }
    }
    p
}

/// Indexes as Kubernetes writes `completedIndexes`: ascending, runs as `a-b`.
fn ranges(set: &BTreeSet<u64>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut it = set.iter().copied().peekable();
    while let Some(a) = it.next() {
        let mut b = a;
        while it.peek() == Some(&(b + 1)) {
            b += 1;
            it.next();
        }
        out.push(if a == b {
            a.to_string()
        } else {
            format!("{a}-{b}")
        });
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: &str = "2026-01-01T00:00:00Z";
    const NOW: i64 = 1_767_225_600; // T0

    fn job(extra: Value) -> Value {
        let mut j = json!({"metadata": {"name": "j", "namespace": "default", "uid": "u"},
            "spec": {"completions": 3, "parallelism": 2, "backoffLimit": 1,
                "template": {"metadata": {"labels": {"job-name": "j"}},
                    "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "module:x"}]}}}});
        if let (Some(s), Some(e)) = (j["spec"].as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        j
    }

    fn pod(phase: &str) -> Value {
        json!({"metadata": {"name": format!("p-{phase}")}, "status": {"phase": phase}})
    }

    #[test]
    fn runs_up_to_parallelism_until_completions() {
        let p = plan(&job(json!({})), &[], NOW, T0, None);
        assert_eq!(p.create, 2);
        assert_eq!(p.status["startTime"], T0);
        let (ok, run) = (pod("Succeeded"), pod("Running"));
        // Two done, one running: the last completion is under way.
        let p = plan(&job(json!({})), &[&ok, &ok, &run], NOW, T0, None);
        assert_eq!(p.create, 0);
        let p = plan(&job(json!({})), &[&ok, &ok, &ok], NOW, T0, None);
        assert_eq!(p.status["conditions"][0]["type"], "Complete");
        assert_eq!(p.status["succeeded"], 3);
        assert_eq!(p.status["completionTime"], T0);
    }

    #[test]
    fn fails_past_its_backoff_limit_or_deadline() {
        let (bad, run) = (pod("Failed"), pod("Running"));
        let p = plan(&job(json!({})), &[&bad], NOW, T0, None);
        assert_eq!(p.create, 2, "one failure is within backoffLimit 1");
        // The next pods wait out the back-off after a failure: 10 s after the first.
        let p = plan(&job(json!({})), &[&bad], NOW, T0, Some(NOW - 5));
        assert_eq!((p.create, p.backing_off), (0, true));
        let p = plan(&job(json!({})), &[&bad], NOW, T0, Some(NOW - 10));
        assert_eq!((p.create, p.backing_off), (2, false));
        assert_eq!(
            [1, 2, 3, 7, 20].map(backoff_delay),
            [10, 20, 40, 360, 360],
            "doubling up to six minutes"
        );
        let p = plan(&job(json!({})), &[&bad, &bad, &run], NOW, T0, None);
        assert_eq!(p.status["conditions"][0]["reason"], "BackoffLimitExceeded");
        assert_eq!(p.delete, ["p-Running"]);
        assert_eq!(p.create, 0);
        let mut started = job(json!({"activeDeadlineSeconds": 10}));
        started["status"] = json!({"startTime": T0});
        let p = plan(&started, &[&run], NOW + 5, T0, None);
        assert!(p.status["conditions"].is_null());
        let p = plan(&started, &[&run], NOW + 10, T0, None);
        assert_eq!(p.status["conditions"][0]["reason"], "DeadlineExceeded");
    }

    /// A pod of index `i`, as the controllers' cache holds it (labels, no annotations).
    fn at(phase: &str, i: u64) -> Value {
        json!({"metadata": {"name": format!("p-{phase}-{i}"),
            "labels": {"batch.kubernetes.io/job-completion-index": i.to_string()}},
            "status": {"phase": phase}})
    }

    #[test]
    fn indexed_jobs_run_each_index_until_it_succeeds() {
        let j = job(json!({"completionMode": "Indexed", "completions": 5, "parallelism": 2}));
        let p = plan(&j, &[], NOW, T0, None);
        assert_eq!((p.create, p.indexes.clone()), (2, vec![0, 1]));
        assert_eq!(p.status["completedIndexes"], "");
        // 0 done, 1 running, 2 done twice (a retry), 3 failed once: 3 and 4 are next.
        let pods = [
            at("Succeeded", 0),
            at("Running", 1),
            at("Succeeded", 2),
            at("Succeeded", 2),
            at("Failed", 3),
        ];
        let refs: Vec<&Value> = pods.iter().collect();
        let p = plan(&j, &refs, NOW, T0, None);
        assert_eq!(p.status["succeeded"], 2, "each index counts once");
        assert_eq!(p.status["completedIndexes"], "0,2");
        assert_eq!(p.indexes, [3], "parallelism 2, one running");
        let all: Vec<Value> = (0..5).map(|i| at("Succeeded", i)).collect();
        let refs: Vec<&Value> = all.iter().collect();
        let p = plan(&j, &refs, NOW, T0, None);
        assert_eq!(p.status["conditions"][0]["type"], "Complete");
        assert_eq!(p.status["completedIndexes"], "0-4");
        assert_eq!(ranges(&[0, 1, 2, 4, 6, 7].into()), "0-2,4,6-7");
        let pod = pod_for_index(&j, 3);
        assert_eq!(pod["metadata"]["generateName"], "j-3-");
        assert_eq!(pod["metadata"]["annotations"][INDEX], "3");
        assert_eq!(pod["metadata"]["labels"][INDEX], "3");
        assert_eq!(pod["metadata"]["labels"]["job-name"], "j");
        assert_eq!(pod["spec"]["hostname"], "j-3");
        assert_eq!(
            pod["spec"]["containers"][0]["env"],
            json!([{"name": "JOB_COMPLETION_INDEX", "value": "3"}])
        );
    }

    #[test]
    fn counted_pods_stay_counted_when_deleted() {
        let (ok, bad) = (pod("Succeeded"), pod("Failed"));
        let mut j = job(json!({"backoffLimit": 6}));
        let p = plan(&j, &[&ok, &ok, &bad], NOW, T0, None);
        assert_eq!(
            (&p.status["succeeded"], &p.status["failed"]),
            (&json!(2), &json!(1))
        );
        // Its pods deleted (a drain): the counts hold, and no pod replaces a counted one.
        j["status"] = p.status;
        let p = plan(&j, &[], NOW, T0, None);
        assert_eq!(
            (&p.status["succeeded"], &p.status["failed"]),
            (&json!(2), &json!(1))
        );
        assert_eq!(p.create, 1);
        // An Indexed Job keeps its completed indexes.
        let mut ix = job(json!({"completionMode": "Indexed"}));
        ix["status"] = json!({"succeeded": 2, "completedIndexes": "0,2"});
        let p = plan(&ix, &[], NOW, T0, None);
        assert_eq!(p.status["completedIndexes"], "0,2");
        assert_eq!(p.indexes, [1]);
        assert_eq!(parse_ranges("0-2,5,x,7-"), BTreeSet::from([0, 1, 2, 5]));
    }

    #[test]
    fn a_suspended_job_stops_its_pods_until_resumed() {
        let mut running = pod("Running");
        running["metadata"]["name"] = json!("p1");
        let mut j = job(json!({"suspend": true}));
        j["status"] = json!({"startTime": T0, "active": 1});
        let p = plan(&j, &[&running], NOW, T0, None);
        assert_eq!(p.delete, ["p1"]);
        assert_eq!(p.create, 0);
        assert!(p.status["startTime"].is_null(), "{}", p.status);
        assert_eq!(p.status["conditions"][0]["type"], "Suspended");
        assert_eq!(p.status["conditions"][0]["status"], "True");
        assert_eq!(
            p.events,
            [("Normal", "Suspended".into(), "Job suspended".into())]
        );
        // Resumed: a new start, pods again, the condition turned False.
        j["status"] = p.status;
        j["spec"]["suspend"] = json!(false);
        let later = "2026-01-01T00:10:00Z";
        let p = plan(&j, &[], NOW + 600, later, None);
        assert_eq!(p.create, 2);
        assert_eq!(p.status["startTime"], later);
        assert_eq!(p.status["conditions"][0]["status"], "False");
        assert_eq!(p.status["conditions"][0]["reason"], "JobResumed");
        assert_eq!(p.events[0].1, "Resumed");
        // Completing keeps the Suspended condition beside Complete.
        j["status"] = p.status;
        let done = pod("Succeeded");
        let p = plan(&j, &[&done, &done, &done], NOW + 700, later, None);
        let types: Vec<&Value> = p.status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| &c["type"])
            .collect();
        assert_eq!(types, ["Suspended", "Complete"]);
        assert_eq!(p.status["conditions"][1]["reason"], "CompletionsReached");
    }

    #[test]
    fn a_finished_job_expires_after_its_ttl() {
        let mut done = job(json!({"ttlSecondsAfterFinished": 30}));
        done["status"] = json!({"conditions": [{"type": "Complete", "status": "True",
            "lastTransitionTime": T0}]});
        assert!(!plan(&done, &[], NOW + 29, T0, None).expire);
        let p = plan(&done, &[], NOW + 30, T0, None);
        assert!(p.expire && p.create == 0);
        let p = pod_for(&done);
        assert_eq!(p["metadata"]["ownerReferences"][0]["kind"], "Job");
        assert_eq!(p["metadata"]["generateName"], "j-");
    }

    fn exited(name: &str, code: i64, index: Option<u64>) -> Value {
        let mut p = json!({"metadata": {"name": name, "namespace": "default", "labels": {}},
            "status": {"phase": "Failed", "containerStatuses": [
                {"name": "c", "state": {"terminated": {"exitCode": code}}}]}});
        if let Some(i) = index {
            p["metadata"]["labels"][INDEX] = json!(i.to_string());
        }
        p
    }

    #[test]
    fn pod_failure_policies_decide_per_failed_pod() {
        let policy = json!({"rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "FailJob", "onExitCodes": {"containerName": "c", "operator": "In", "values": [42]}},
            {"action": "Ignore", "onExitCodes": {"operator": "NotIn", "values": [1, 42]}}]});
        let j = job(json!({"backoffLimit": 0, "podFailurePolicy": policy}));
        // Exit code 3 is ignored: not counted, and the Job goes on.
        let three = exited("p3", 3, None);
        let p = plan(&j, &[&three], NOW, T0, None);
        assert_eq!(p.status["failed"], 0);
        assert!(p.status["conditions"].is_null());
        assert_eq!(p.create, 2);
        // Evicted (a disruption) is ignored too, whatever its exit code.
        let mut evicted = exited("pe", 1, None);
        evicted["status"]["conditions"] = json!([{"type": "DisruptionTarget", "status": "True"}]);
        assert_eq!(plan(&j, &[&evicted], NOW, T0, None).status["failed"], 0);
        // Exit code 1 matches no rule: counted, past backoffLimit 0.
        let one = exited("p1", 1, None);
        let p = plan(&j, &[&one], NOW, T0, None);
        assert_eq!(p.status["conditions"][0]["reason"], "BackoffLimitExceeded");
        // Exit code 42 fails the Job at once, saying which rule.
        let j = job(json!({"backoffLimit": 6, "podFailurePolicy": j["spec"]["podFailurePolicy"]}));
        let stop = exited("p42", 42, None);
        let run = pod("Running");
        let p = plan(&j, &[&stop, &run], NOW, T0, None);
        assert_eq!(p.status["conditions"][0]["type"], "Failed");
        assert_eq!(p.status["conditions"][0]["reason"], "PodFailurePolicy");
        assert_eq!(
            p.status["conditions"][0]["message"],
            "Container c for pod default/p42 failed with exit code 42 matching FailJob rule at index 1"
        );
        assert_eq!(p.delete, vec!["p-Running".to_string()]);
    }

    #[test]
    fn indexes_fail_alone_past_their_own_backoff_limit() {
        let j = job(
            json!({"completionMode": "Indexed", "completions": 3, "parallelism": 3,
            "backoffLimit": i32::MAX, "backoffLimitPerIndex": 1}),
        );
        // Index 1 failed twice: given up; 0 and 2 go on.
        let pods = [
            exited("a", 1, Some(1)),
            exited("b", 1, Some(1)),
            at("Succeeded", 0),
            exited("c", 1, Some(2)),
        ];
        let refs: Vec<&Value> = pods.iter().collect();
        let p = plan(&j, &refs, NOW, T0, None);
        assert_eq!(p.status["failedIndexes"], "1");
        assert_eq!(p.indexes, [2], "index 2 failed once: retried");
        // ... but not within the back-off after the latest failure.
        let p = plan(&j, &refs, NOW, T0, Some(NOW - 5));
        assert!(p.indexes.is_empty() && p.create == 0 && p.backing_off);
        assert!(p.status["conditions"].is_null());
        // Once 2 has succeeded, every index has ended: the Job fails for index 1.
        let ok2 = at("Succeeded", 2);
        let refs: Vec<&Value> = pods.iter().chain([&ok2]).collect();
        let p = plan(&j, &refs, NOW, T0, None);
        assert_eq!(p.status["conditions"][0]["reason"], "FailedIndexes");
        assert_eq!(p.status["completedIndexes"], "0,2");
        // With maxFailedIndexes 0 the first index given up ends it.
        let mut strict = j.clone();
        strict["spec"]["maxFailedIndexes"] = json!(0);
        let refs: Vec<&Value> = pods.iter().collect();
        let p = plan(&strict, &refs, NOW, T0, None);
        assert_eq!(
            p.status["conditions"][0]["reason"],
            "MaxFailedIndexesExceeded"
        );
        // FailIndex gives an index up at its first failure.
        let mut fail_index = j.clone();
        fail_index["spec"]["podFailurePolicy"] = json!({"rules": [
            {"action": "FailIndex", "onExitCodes": {"operator": "In", "values": [7]}}]});
        let seven = exited("d", 7, Some(0));
        let p = plan(&fail_index, &[&seven], NOW, T0, None);
        assert_eq!(p.status["failedIndexes"], "0");
        assert_eq!(p.indexes, [1, 2]);
    }
}
