"""Ray Serve application: session replicas, sticky routing, gRPC ingress."""
