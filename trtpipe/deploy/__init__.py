"""Scale-out on existing serving engines: Ray Serve (:mod:`trtpipe.deploy.ray`); KServe
manifests live in ``deploy/kserve/``."""
