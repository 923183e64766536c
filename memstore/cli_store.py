def add_store_commands(group):
    pass
