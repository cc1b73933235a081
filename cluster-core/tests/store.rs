//! Store contract tests, run against both a real etcd (started by the harness) and
//! `MemoryStore`, plus etcd restart scenarios. Every wait is on a condition with a timeout.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_core::{
    Capacity, ClusterName, Membership, MemoryStore, Role, Store, StoreError, WatchEvent, WorkerId, WorkerInfo, keys,
    register,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use common::Etcd;

const TTL: Duration = Duration::from_secs(2);
/// Generous bound for one condition: etcd checks lease expiry about every 500 ms.
const WAIT: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| panic!("timed out after {limit:?} waiting for {what}"))
}

/// Next event that is not `Synced`.
async fn next_change(rx: &mut mpsc::Receiver<WatchEvent>) -> WatchEvent {
    within("a watch event", WAIT, async {
        loop {
            match rx.recv().await.expect("watch channel open") {
                WatchEvent::Synced => continue,
                event => return event,
            }
        }
    })
    .await
}

/// Skips events until one satisfies `pred`.
async fn wait_event(rx: &mut mpsc::Receiver<WatchEvent>, what: &str, pred: impl Fn(&WatchEvent) -> bool) {
    within(what, WAIT, async {
        loop {
            if pred(&rx.recv().await.expect("watch channel open")) {
                return;
            }
        }
    })
    .await
}

async fn wait_members(m: &Membership, what: &str, pred: impl Fn(&cluster_core::registration::WorkerMap) -> bool) {
    let mut view = m.subscribe();
    within(what, WAIT, view.wait_for(|map| pred(map))).await.expect("membership task alive");
}

fn worker(id: &str, role: Role) -> WorkerInfo {
    WorkerInfo {
        id: WorkerId::new(id).expect("valid id"),
        role,
        address: format!("http://127.0.0.1:9{}", id.len()),
        capacity: Capacity { max_sequences: 8, max_batch_tokens: 4096, expert_slots: 0 },
        model: "deepseek-ai/DeepSeek-V3".into(),
        version: "0.1.0".into(),
    }
}

fn put(key: &str, value: &str) -> WatchEvent {
    WatchEvent::Put { key: key.into(), value: value.into() }
}

// ---- contract: one generic function per behaviour ------------------------------------

async fn contract_put_get_prefix_delete(store: Arc<dyn Store>) {
    store.put("/t/a/1", b"one".to_vec()).await.expect("put");
    store.put("/t/a/2", b"two".to_vec()).await.expect("put");
    store.put("/t/b/1", b"other".to_vec()).await.expect("put");
    assert_eq!(store.get("/t/a/1").await.expect("get"), Some(b"one".to_vec()));
    assert_eq!(store.get("/t/missing").await.expect("get"), None);
    let under_a: Vec<(String, Vec<u8>)> =
        store.get_prefix("/t/a/").await.expect("prefix").into_iter().map(|kv| (kv.key, kv.value)).collect();
    assert_eq!(under_a, vec![("/t/a/1".into(), b"one".to_vec()), ("/t/a/2".into(), b"two".to_vec())]);
    store.put("/t/a/1", b"uno".to_vec()).await.expect("overwrite");
    assert_eq!(store.get("/t/a/1").await.expect("get"), Some(b"uno".to_vec()));
    assert!(store.delete("/t/a/1").await.expect("delete"));
    assert!(!store.delete("/t/a/1").await.expect("delete again"));
    assert_eq!(store.get_prefix("/t/a/").await.expect("prefix").len(), 1);
}

async fn contract_watch_sees_put_and_delete(store: Arc<dyn Store>) {
    store.put("/w/x/old", b"0".to_vec()).await.expect("put");
    let mut rx = store.watch_prefix("/w/x/").await.expect("watch");
    // Initial contents, then Synced.
    assert_eq!(within("initial put", WAIT, rx.recv()).await, Some(put("/w/x/old", "0")));
    assert_eq!(within("synced", WAIT, rx.recv()).await, Some(WatchEvent::Synced));
    store.put("/w/x/k", b"1".to_vec()).await.expect("put");
    store.put("/w/other", b"ignored".to_vec()).await.expect("put outside prefix");
    store.delete("/w/x/k").await.expect("delete");
    assert_eq!(next_change(&mut rx).await, put("/w/x/k", "1"));
    assert_eq!(next_change(&mut rx).await, WatchEvent::Delete { key: "/w/x/k".into() });
}

async fn contract_leases(store: Arc<dyn Store>) {
    let lease = store.grant_lease(TTL).await.expect("grant");
    store.put_with_lease("/l/k", b"v".to_vec(), lease).await.expect("put with lease");
    assert_eq!(store.keep_alive(lease).await.expect("keep alive"), TTL);
    store.revoke(lease).await.expect("revoke");
    assert_eq!(store.get("/l/k").await.expect("get"), None);
    assert!(matches!(store.keep_alive(lease).await, Err(StoreError::LeaseExpired(id)) if id == lease));
    assert!(matches!(store.put_with_lease("/l/k", vec![], lease).await, Err(StoreError::LeaseExpired(_))));
    store.revoke(lease).await.expect("revoking a gone lease is fine");

    // Unrenewed lease expires by itself and takes its key along.
    let mut rx = store.watch_prefix("/l/").await.expect("watch");
    let lease = store.grant_lease(Duration::from_secs(1)).await.expect("grant");
    store.put_with_lease("/l/e", b"v".to_vec(), lease).await.expect("put with lease");
    wait_event(&mut rx, "expiry delete", |e| *e == WatchEvent::Delete { key: "/l/e".into() }).await;
    assert_eq!(store.get("/l/e").await.expect("get"), None);
}

async fn contract_create_with_lease(store: Arc<dyn Store>) {
    let a = store.grant_lease(TTL).await.expect("grant");
    let b = store.grant_lease(TTL).await.expect("grant");
    assert!(store.create_with_lease("/c/leader", b"a".to_vec(), a).await.expect("create"));
    assert!(!store.create_with_lease("/c/leader", b"b".to_vec(), b).await.expect("second create is refused"));
    assert!(
        store.create_with_lease("/c/leader", b"a".to_vec(), a).await.expect("a retry by the holder is not refused")
    );
    assert_eq!(store.get("/c/leader").await.expect("get"), Some(b"a".to_vec()));
    store.revoke(a).await.expect("revoke");
    assert!(store.create_with_lease("/c/leader", b"b".to_vec(), b).await.expect("create after the holder left"));
    assert_eq!(store.get("/c/leader").await.expect("get"), Some(b"b".to_vec()));
    // Writes fenced by the key: only the holder's lease passes.
    assert!(store.put_fenced("/c/data", b"1".to_vec(), "/c/leader", b).await.expect("fenced put"));
    assert!(!store.put_fenced("/c/data", b"2".to_vec(), "/c/leader", a).await.expect("refused"));
    assert_eq!(store.get("/c/data").await.expect("get"), Some(b"1".to_vec()));
    store.revoke(b).await.expect("revoke");
    assert!(!store.put_fenced("/c/data", b"3".to_vec(), "/c/leader", b).await.expect("refused after expiry"));
    assert_eq!(store.get("/c/data").await.expect("get"), Some(b"1".to_vec()));
    assert!(matches!(store.create_with_lease("/c/x", vec![], b).await, Err(StoreError::LeaseExpired(_))));
}

async fn contract_registration_and_membership(store: Arc<dyn Store>) {
    let cluster = ClusterName::new("reg").expect("valid");
    let (tracker, shutdown) = (TaskTracker::new(), CancellationToken::new());
    let members = Membership::start(store.as_ref(), &cluster, &tracker, &shutdown).await.expect("membership");
    assert!(members.workers().is_empty());

    let d0 = worker("d0", Role::Decode);
    let e0 = worker("e0", Role::Expert);
    let reg_d0 = register(store.clone(), &cluster, d0.clone(), TTL, &tracker, &shutdown).await.expect("register");
    let reg_e0 = register(store.clone(), &cluster, e0.clone(), TTL, &tracker, &shutdown).await.expect("register");
    assert_eq!(reg_d0.key(), keys::worker_key(&cluster, Role::Decode, &d0.id));
    wait_members(&members, "both workers", |m| m.len() == 2).await;
    assert_eq!(members.get(&d0.id), Some(d0.clone()));
    assert_eq!(members.by_role(Role::Expert), vec![e0.clone()]);

    // Renewal keeps it past several TTLs: wait for 3 renewals' worth of lease activity by
    // checking the key is still there after the lease would have expired unrenewed.
    let started = Instant::now();
    while started.elapsed() < TTL * 2 {
        assert!(members.get(&d0.id).is_some(), "renewed worker vanished");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Stop renewing (as a crashed process would): gone within the TTL (plus expiry slack).
    drop(reg_d0);
    let stopped = Instant::now();
    wait_members(&members, "d0 to expire", |m| !m.contains_key(&d0.id)).await;
    let gone_after = stopped.elapsed();
    assert!(gone_after <= TTL + Duration::from_secs(2), "took {gone_after:?} to expire");
    assert!(members.get(&e0.id).is_some());

    // Deregistering removes at once.
    reg_e0.deregister().await.expect("deregister");
    wait_members(&members, "e0 removed", |m| m.is_empty()).await;

    shutdown.cancel();
    tracker.close();
    within("tasks to stop", WAIT, tracker.wait()).await;
}

async fn contract_reregisters_after_lease_loss(store: Arc<dyn Store>) {
    let cluster = ClusterName::new("rereg").expect("valid");
    let (tracker, shutdown) = (TaskTracker::new(), CancellationToken::new());
    let members = Membership::start(store.as_ref(), &cluster, &tracker, &shutdown).await.expect("membership");
    let p0 = worker("p0", Role::Prefill);
    let mut reg = register(store.clone(), &cluster, p0.clone(), TTL, &tracker, &shutdown).await.expect("register");
    wait_members(&members, "p0", |m| m.contains_key(&p0.id)).await;

    let old = reg.lease();
    store.revoke(old).await.expect("revoke behind its back");
    let fresh = within("re-registration", WAIT, reg.changed_from(old)).await.expect("registration alive");
    assert_ne!(fresh, old);
    wait_members(&members, "p0 back", |m| m.get(&p0.id) == Some(&p0)).await;

    shutdown.cancel();
    tracker.close();
    within("tasks to stop", WAIT, tracker.wait()).await;
}

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let store = cluster_core::MemoryStore::new();
                    super::$name(std::sync::Arc::new(store.clone())).await;
                    store.shutdown().await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let etcd = super::Etcd::start().await;
                    let store = etcd.store().await;
                    super::$name(std::sync::Arc::new(store.clone())).await;
                    store.shutdown().await;
                }
            )*
        }
    };
}

on_both_stores!(
    contract_put_get_prefix_delete,
    contract_watch_sees_put_and_delete,
    contract_leases,
    contract_create_with_lease,
    contract_election,
    contract_registration_and_membership,
    contract_reregisters_after_lease_loss,
);

// ---- etcd restarts ---------------------------------------------------------------------

/// A watch survives a kill + restart (same data dir): it resyncs, then streams live events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_survives_restart() {
    let mut etcd = Etcd::start().await;
    let store = etcd.store().await;
    store.put("/r/a", b"1".to_vec()).await.expect("put");
    let mut rx = store.watch_prefix("/r/").await.expect("watch");
    wait_event(&mut rx, "initial sync", |e| *e == WatchEvent::Synced).await;

    etcd.restart().await;
    // The watch reconnects on its own; a change after the restart reaches it.
    store.put("/r/b", b"2".to_vec()).await.expect("put after restart");
    store.delete("/r/a").await.expect("delete after restart");
    wait_event(&mut rx, "put after restart", |e| *e == put("/r/b", "2")).await;
    wait_event(&mut rx, "delete after restart", |e| *e == WatchEvent::Delete { key: "/r/a".into() }).await;

    // Data loss: the resync reports keys that vanished as deletes.
    etcd.restart_empty().await;
    store.put("/r/c", b"3".to_vec()).await.expect("put on empty server");
    wait_event(&mut rx, "resync delete of /r/b", |e| *e == WatchEvent::Delete { key: "/r/b".into() }).await;
    wait_event(&mut rx, "put on empty server", |e| *e == put("/r/c", "3")).await;
    store.shutdown().await;
}

/// Registration and Membership come back after etcd restarts, with and without its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_registration_and_membership_recover_after_restart() {
    let mut etcd = Etcd::start().await;
    let store: Arc<dyn Store> = Arc::new(etcd.store().await);
    let cluster = ClusterName::new("restart").expect("valid");
    let (tracker, shutdown) = (TaskTracker::new(), CancellationToken::new());
    let members = Membership::start(store.as_ref(), &cluster, &tracker, &shutdown).await.expect("membership");
    let r0 = worker("r0", Role::Router);
    let key = keys::worker_key(&cluster, Role::Router, &r0.id);
    let mut reg_r0 = register(store.clone(), &cluster, r0.clone(), TTL, &tracker, &shutdown).await.expect("register");
    wait_members(&members, "r0", |m| m.contains_key(&r0.id)).await;

    // Same data dir: the lease survives (etcd resets TTLs on restart); renewal resumes.
    etcd.restart().await;
    let d1 = worker("d1", Role::Decode);
    let _reg_d1 = register(store.clone(), &cluster, d1.clone(), TTL, &tracker, &shutdown).await.expect("register");
    wait_members(&members, "r0 and d1 after restart", |m| m.contains_key(&r0.id) && m.contains_key(&d1.id)).await;
    // Still there after a full TTL with renewal going through the new server process.
    let lease_before = reg_r0.lease();
    let since = Instant::now();
    while since.elapsed() < TTL + Duration::from_millis(500) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(store.get(&key).await.expect("get").is_some(), "r0 key lost after restart");
    assert_eq!(reg_r0.lease(), lease_before);

    // Empty data dir: every key and lease is gone; both workers re-register and
    // Membership (resync after reconnect) shows them again.
    etcd.restart_empty().await;
    within("r0 re-registration", WAIT, reg_r0.changed_from(lease_before)).await.expect("registration alive");
    // A worker registered after the restart shows the watch reconnected; the resync first
    // dropped the vanished keys, so r0 and d1 being present means they came back.
    let p2 = worker("p2", Role::Prefill);
    let _reg_p2 = register(store.clone(), &cluster, p2.clone(), TTL, &tracker, &shutdown).await.expect("register");
    wait_members(&members, "all three workers on the empty server", |m| {
        m.contains_key(&r0.id) && m.contains_key(&d1.id) && m.contains_key(&p2.id)
    })
    .await;
    assert!(store.get(&key).await.expect("get").is_some(), "r0 key back");

    shutdown.cancel();
    tracker.close();
    within("tasks to stop", WAIT, tracker.wait()).await;
}

/// Membership::start on MemoryStore is immediate; the tests above cover the rest.
#[tokio::test]
async fn memory_store_shutdown_closes_watches() {
    let store = MemoryStore::new();
    let mut rx = store.watch_prefix("/").await.expect("watch");
    assert_eq!(rx.recv().await, Some(WatchEvent::Synced));
    store.shutdown().await;
    assert_eq!(within("close", WAIT, rx.recv()).await, None);
    assert!(matches!(store.watch_prefix("/").await, Err(StoreError::Closed)));
}

// ---- leader election -------------------------------------------------------------------

/// Two candidates: one leads; when it resigns the other is elected; when the new leader's
/// process stops renewing (lease expiry) a third takes over.
async fn contract_election(store: Arc<dyn Store>) {
    use cluster_core::election::campaign;
    let (tracker, shutdown) = (TaskTracker::new(), CancellationToken::new());
    let key = "/e/leader";
    let ttl = Duration::from_secs(1);
    let first = campaign(store.clone(), key, b"a".to_vec(), ttl, &tracker, &shutdown).await.expect("elected");
    let standby = {
        let (store, tracker, shutdown) = (store.clone(), tracker.clone(), shutdown.clone());
        tokio::spawn(async move { campaign(store, key, b"b".to_vec(), ttl, &tracker, &shutdown).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!standby.is_finished(), "a second leader while the first holds the key");
    assert_eq!(store.get(key).await.expect("get"), Some(b"a".to_vec()));
    first.resign().await.expect("resign");
    let second = within("standby elected", WAIT, standby).await.expect("task").expect("elected");
    assert_eq!(store.get(key).await.expect("get"), Some(b"b".to_vec()));

    // A leader that stops renewing (its process is gone) loses the key at lease expiry.
    let lost = second.lost();
    let third = {
        let (store, tracker, shutdown) = (store.clone(), tracker.clone(), shutdown.clone());
        tokio::spawn(async move { campaign(store, key, b"c".to_vec(), ttl, &tracker, &shutdown).await })
    };
    lost.cancel(); // stops the renewal task, as a crash would
    let _third = within("third elected after expiry", WAIT, third).await.expect("task").expect("elected");
    assert_eq!(store.get(key).await.expect("get"), Some(b"c".to_vec()));
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
}
