print("stoq")
