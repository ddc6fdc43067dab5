"""placeholder (ESP both ways is added next)"""
