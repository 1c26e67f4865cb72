// Package jobs runs CI jobs in throwaway microVMs pooled across hosts through the broker.
//
// A job goes through three steps, each a broker exchange:
//
//   - Submit (the prepare hook) queues a Spec on broker.WorkCIJob with the job id as its work id
//     and waits for job.started (the VM answers; it names the host and VM) or job.failed.
//   - Exec (the run hook) sends a stage script to that host with a core NATS request on
//     ControlSubject(host, "exec"); the host runs it in the job VM and streams its output into the
//     VIRTKIT_EXEC stream (vk.exec.<exec>.stdout|stderr, then .exit), which Exec follows with an
//     ordered consumer, so a reconnect replays what it missed. The hook keeps the session alive
//     with requests on vk.exec.<exec>.signal (signal 0 is a keep-alive); SIGTERM and SIGKILL are
//     forwarded to the guest process group, and a session whose hook goes silent for LeaseTimeout
//     is killed (the hook was SIGKILLed or its machine vanished).
//   - Cleanup (the cleanup hook) asks the host to tear the job down and waits until it has.
//
// On the host, Runner is the worker that takes ci.job items while the host's Slots have room,
// holds the item (and its slot) for the job's whole life, boots the job VM and its service VMs on
// a LAN of the job's own, and acks the item when the job is cleaned up or reaped (no cleanup
// within the job timeout). A redelivered item (its host died, or shut down mid-job) is never run
// again: it is failed as a system failure so that GitLab retries the job.
//
// Concurrency: Runner and the client functions are safe for concurrent use; every goroutine a
// Runner starts ends before Run returns.
package jobs
