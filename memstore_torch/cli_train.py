def add_train_commands(group):
    pass
