package cli

// Commands whose issues are still open. A real command of the same name, registered from its own
// file, replaces the placeholder; delete the line here when it lands.
func init() {
	registerPending(notYet("serve", "Run the daemon: embedded NATS broker and the workers", 2))
	registerPending(notYet("status", "Show broker, streams, hosts and workers", 2))
	registerPending(notYet("run IMAGE [-- CMD...]", "Convert if needed, boot IMAGE as a microVM and run CMD in it", 7))
	registerPending(notYet("launch", "Boot a standalone VM from a kernel and a disk", 7))
	registerPending(notYet("fleet", "Run a dev fleet of microVMs on one *.lan", 8))
	registerPending(notYet("gitlab", "GitLab Runner custom executor hooks: config, prepare, run, cleanup", 9))
	registerPending(notYet("switch", "Run the userspace L2 switch and gateway", 6))
	registerPending(notYet("mkext-tar TAR|- OUT.ext4", "Build an ext4 image from a tar stream", 3))
	registerPending(notYet("mkext DIR OUT.ext4", "Build an ext4 image from a directory", 3))
	registerPending(notYet("convert REF", "Convert an OCI/Docker image into a bootable bundle", 4))
	registerPending(notYet("oci-pull REF OUT.tar", "Pull an image and write its flattened rootfs tar", 4))
	registerPending(notYet("virtiofsd", "Serve a directory over vhost-user virtio-fs", 10))
	registerPending(notYet("forward", "Forward a host TCP port to a port in a VM", 5))
}
