"""What is attacked: the data, the victim network, the client that shares a gradient (its defense applied),
the trial plan (which images, which seeds) and a group's sharing. Nothing here knows of an attack."""
