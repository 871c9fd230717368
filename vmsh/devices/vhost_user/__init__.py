"""vhost-user: virtio devices whose queues a backend process serves over a unix socket.

``protocol`` is the wire format, ``frontend`` the conversation with one backend, ``device`` the
generic virtio device model handing its rings to the backend, ``blk`` and ``net`` the device
types (virtio-fs is another small subclass of ``device.VhostUserDevice``).
"""
