print("stoq-node")
