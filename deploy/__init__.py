"""Deploy the app with Flower's Deployment Engine (TLS + SuperNode authentication).

``deploy.cluster`` starts a real SuperLink and SuperNodes on this machine;
``deploy.node_keys`` makes SuperNode key pairs; ``deploy.devices`` registers them
and keeps the device registry; ``deploy.fleet_front`` is the devices' entry
(Fleet API only); ``deploy/certs.sh`` makes the TLS certificates. See
``deploy/README.md``.
"""
